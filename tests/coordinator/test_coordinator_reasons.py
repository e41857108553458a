"""Rollout reasons (``coordinator.reasons``): each cause renders the text the statuses,
the records and the audit log have always shown, bounded, and carries what it needs."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from coordinator.reasons import REFUSALS, WAVE_VERDICTS, RolloutReason
from schemas import Cause, UsageError, WaveCounts

COUNTS = WaveCounts(members=6, targeted=5, updated=4, healthy=3, unhealthy=1)


@pytest.mark.parametrize(
    ("reason", "text"),
    [
        (RolloutReason(cause=Cause.OPERATOR_ABORT), "aborted by operator"),
        (RolloutReason(cause=Cause.OPERATOR_PAUSE), "paused by operator"),
        (
            RolloutReason(cause=Cause.UNHEALTHY, wave=1, counts=COUNTS),
            "wave 2: 1 of 4 reporting devices unhealthy",
        ),
        (
            RolloutReason(cause=Cause.PROMOTED, wave=0, counts=COUNTS),
            "wave 1: 3 of 5 devices healthy",
        ),
        (
            RolloutReason(cause=Cause.EMPTY_WAVE, wave=0, counts=WaveCounts()),
            "wave 1: no device to ask (0 offline)",
        ),
        (
            RolloutReason(cause=Cause.TIMED_OUT, wave=2, counts=COUNTS),
            "wave 3: timed out with 3 of 5 healthy",
        ),
        (
            RolloutReason(cause=Cause.SPEC_REFUSED, problems=("malformed: not msgpack",)),
            "spec refused: malformed: not msgpack",
        ),
        (
            RolloutReason(
                cause=Cause.CLASSES_UNAVAILABLE,
                problems=("unknown classes ['toaster']", "classes already in rollout ['r1']"),
            ),
            "unknown classes ['toaster']; classes already in rollout ['r1']",
        ),
        (
            RolloutReason(cause=Cause.ARTIFACT_UNAVAILABLE, problems=("artifact: not found",)),
            "artifact: not found",
        ),
        (
            RolloutReason(cause=Cause.INVALID_CANDIDATE, problems=("variant fp32: no graph",)),
            "variant fp32: no graph",
        ),
        (
            RolloutReason(cause=Cause.GATE_FAILED, problems=("c: no variant passes",)),
            "c: no variant passes",
        ),
    ],
    ids=lambda v: v.cause.value if isinstance(v, RolloutReason) else "",
)
def test_each_cause_renders_its_text(reason: RolloutReason, text: str) -> None:
    assert str(reason) == text


def test_every_cause_has_a_text() -> None:
    for cause in Cause:
        if cause in WAVE_VERDICTS:
            reason = RolloutReason(cause=cause, wave=0, counts=COUNTS)
        else:
            reason = RolloutReason(cause=cause, problems=("p",) if cause in REFUSALS else ())
        assert str(reason)


def test_a_rollback_quotes_the_devices_after_its_verdict() -> None:
    reason = RolloutReason(
        cause=Cause.UNHEALTHY,
        wave=0,
        counts=COUNTS,
        quoted=("cam-1: p95_latency_ms:35.10>10.00", "cam-2: error_rate:0.2>0.01"),
    )
    assert str(reason) == (
        "wave 1: 1 of 4 reporting devices unhealthy "
        "(cam-1: p95_latency_ms:35.10>10.00; cam-2: error_rate:0.2>0.01)"
    )


def test_the_text_is_bounded_where_it_is_rendered() -> None:
    long = RolloutReason(cause=Cause.INVALID_CANDIDATE, problems=("x" * 5000,), chars=100)
    assert len(str(long)) == 100
    assert str(long).endswith("…")
    quoting = RolloutReason(cause=Cause.OPERATOR_ABORT, quoted=("cam-1: " + "e" * 300,), chars=40)
    assert str(quoting) == "aborted by operator (cam-1: " + "e" * 11 + "…"
    assert len(str(quoting)) == 40
    # By default, within what a status may carry.
    assert len(str(RolloutReason(cause=Cause.GATE_FAILED, problems=("y" * 9000,)))) == 2000


@pytest.mark.parametrize(
    "build",
    [
        lambda: RolloutReason(cause=Cause.TIMED_OUT),
        lambda: RolloutReason(cause=Cause.UNHEALTHY, wave=0),
        lambda: RolloutReason(cause=Cause.OPERATOR_ABORT, wave=0, counts=COUNTS),
        lambda: RolloutReason(cause=Cause.SPEC_REFUSED),
        lambda: RolloutReason(cause=Cause.OPERATOR_PAUSE, problems=("why",)),
    ],
    ids=[
        "verdict-without-counts",
        "verdict-without-wave",
        "wish-with-counts",
        "refusal-without-problems",
        "wish-with-problems",
    ],
)
def test_a_reason_missing_its_numbers_or_problems_is_a_usage_error(
    build: Callable[[], RolloutReason],
) -> None:
    with pytest.raises(UsageError):
        build()
