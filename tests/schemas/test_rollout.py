"""RolloutSpec validation: waves must increase and end at 100 percent."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from schemas import (
    Cause,
    MaintenanceWindow,
    MalformedPayloadError,
    Phase,
    Reason,
    RolloutSpec,
    RolloutStatus,
    WaveCounts,
    WaveSpec,
    decode,
    encode,
)


def _spec_with(spec: RolloutSpec, **changes: Any) -> RolloutSpec:
    data = spec.model_dump()
    if "waves_percent" in changes:
        del data["waves"]  # the shorthand stands in for them
    return RolloutSpec.model_validate({**data, **changes})


@pytest.mark.parametrize(
    "waves",
    [
        pytest.param((100.0,), id="single-full-wave"),
        pytest.param((1.0, 100.0), id="canary-then-all"),
        pytest.param((0.5, 5.0, 25.0, 50.0, 100.0), id="five-waves"),
        pytest.param(tuple(float(p) for p in range(5, 101, 5)), id="twenty-waves"),
    ],
)
def test_increasing_waves_ending_at_100_are_accepted(
    rollout_spec: RolloutSpec, waves: tuple[float, ...]
) -> None:
    assert _spec_with(rollout_spec, waves_percent=waves).waves_percent == waves


@pytest.mark.parametrize(
    ("waves", "why"),
    [
        pytest.param((), "at least 1", id="no-waves"),
        pytest.param((10.0, 50.0), "reach 100", id="stops-short"),
        pytest.param((50.0, 10.0, 100.0), "increase", id="decreasing"),
        pytest.param((10.0, 10.0, 100.0), "increase", id="repeated"),
        pytest.param((10.0, 100.0, 100.0), "increase", id="repeated-100"),
        pytest.param((0.0, 100.0), "greater than 0", id="zero-wave"),
        pytest.param((-5.0, 100.0), "greater than 0", id="negative"),
        pytest.param((10.0, 150.0), "less than or equal to 100", id="beyond-100"),
        pytest.param((float("nan"), 100.0), "finite number", id="nan"),
        pytest.param((*(float(p) for p in range(1, 101, 4)), 100.0), "at most 20", id="too-many"),
    ],
)
def test_waves_that_do_not_increase_to_100_are_refused(
    rollout_spec: RolloutSpec, waves: tuple[float, ...], why: str
) -> None:
    with pytest.raises(ValueError, match=why):
        _spec_with(rollout_spec, waves_percent=waves)


def test_spec_with_bad_waves_on_the_wire_is_rejected_schema(rollout_spec: RolloutSpec) -> None:
    raw = rollout_spec.model_dump(mode="python")
    raw["waves"] = [{"percent": 50.0}, {"percent": 10.0}]
    with pytest.raises(MalformedPayloadError) as info:
        decode(msgpack.packb(raw), RolloutSpec)
    assert info.value.reason is Reason.SCHEMA
    assert "waves" in info.value.detail


def test_a_spec_signed_with_the_percent_shorthand_still_decodes(rollout_spec: RolloutSpec) -> None:
    """Specs signed before waves were objects carry ``waves_percent``."""
    old = rollout_spec.model_dump(mode="python")
    del old["waves"]
    old["waves_percent"] = [5.0, 100.0]
    spec = decode(msgpack.packb(old), RolloutSpec)
    assert spec.waves == (WaveSpec(percent=5.0), WaveSpec(percent=100.0))
    assert spec.waves_percent == (5.0, 100.0)


@pytest.mark.parametrize(
    ("waves", "why"),
    [
        pytest.param([{"count": 5}, {"percent": 100.0}], None, id="count-then-percent"),
        pytest.param([{"count": 1}, {"count": 20}, {"percent": 100.0}], None, id="two-counts"),
        pytest.param([{"percent": 10.0}, {"count": 5}, {"percent": 100.0}], "before", id="late"),
        pytest.param([{"count": 5}, {"count": 5}, {"percent": 100.0}], "increase", id="same"),
        pytest.param([{"count": 5}], "100 percent", id="only-a-count"),
        pytest.param([{"percent": 10.0, "count": 5}, {"percent": 100.0}], "either", id="both"),
        pytest.param([{"min_soak_s": 5.0}, {"percent": 100.0}], "either", id="neither"),
    ],
)
def test_count_waves_come_first_and_increase(
    rollout_spec: RolloutSpec, waves: list[dict[str, Any]], why: str | None
) -> None:
    if why is None:
        spec = _spec_with(rollout_spec, waves=waves)
        assert [str(w) for w in spec.waves][-1] == "100%"
        assert spec.waves_percent == ()
    else:
        with pytest.raises(ValueError, match=why):
            _spec_with(rollout_spec, waves=waves)


def test_maintenance_windows_name_the_rollouts_classes(rollout_spec: RolloutSpec) -> None:
    window = {"start_minute": 120, "end_minute": 240}
    ok = _spec_with(rollout_spec, windows={rollout_spec.classes[0]: window})
    assert str(ok.windows[rollout_spec.classes[0]]) == "02:00-04:00 UTC"
    with pytest.raises(ValueError, match="does not name"):
        _spec_with(rollout_spec, windows={"other-class": window})


@pytest.mark.parametrize(
    ("start", "end", "minute", "open_"),
    [
        (120, 240, 119, False),
        (120, 240, 120, True),
        (120, 240, 239, True),
        (120, 240, 240, False),
        (22 * 60, 60, 23 * 60, True),  # spans midnight
        (22 * 60, 60, 30, True),
        (22 * 60, 60, 12 * 60, False),
    ],
)
def test_a_maintenance_window_is_open_by_the_utc_minute(
    start: int, end: int, minute: int, open_: bool
) -> None:
    window = MaintenanceWindow(start_minute=start, end_minute=end)
    day = 20_000 * 86_400.0
    assert window.open_at(day + minute * 60 + 30) is open_


def test_an_empty_maintenance_window_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        MaintenanceWindow(start_minute=60, end_minute=60)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("success_ratio", 0.0),
        ("success_ratio", 1.01),
        ("max_failure_ratio", 1.0),
        ("max_failure_ratio", -0.1),
        ("generation", 0),
        ("wave_timeout_s", 0.0),
        ("wave_timeout_s", float("inf")),  # would be stored as null and not load back
        ("classes", ()),
        ("id", "../evil"),
    ],
)
def test_spec_fields_out_of_range_are_refused(
    rollout_spec: RolloutSpec, field: str, value: object
) -> None:
    with pytest.raises(ValueError, match=field):
        _spec_with(rollout_spec, **{field: value})


def test_phase_finality_and_reported_counts() -> None:
    assert {p for p in Phase if p.final} == {Phase.COMPLETED, Phase.ROLLED_BACK, Phase.REJECTED}
    counts = WaveCounts(targeted=10, updated=9, healthy=6, unhealthy=2, silent=1)
    assert (counts.reported, counts.failed, counts.judged) == (8, 3, 9)
    assert (counts + counts).silent == 2


def test_a_status_carries_its_cause_beside_the_reason(rollout_status: RolloutStatus) -> None:
    timed_out = rollout_status.model_copy(
        update={
            "phase": Phase.ROLLED_BACK,
            "reason": "wave 2: timed out with 85 of 100 healthy",
            "cause": Cause.TIMED_OUT,
        }
    )
    raw = msgpack.unpackb(encode(timed_out))
    assert (raw["cause"], raw["reason"]) == ("timed_out", timed_out.reason)
    assert decode(encode(timed_out), RolloutStatus) == timed_out


def test_a_status_from_before_causes_decodes_without_one(rollout_status: RolloutStatus) -> None:
    """A status retained by an older coordinator has a reason and no ``cause`` key."""
    old = rollout_status.model_dump(mode="python")
    old.update(phase="rolled_back", reason="aborted by operator")
    del old["cause"]
    status = decode(msgpack.packb(old), RolloutStatus)
    assert (status.reason, status.cause) == ("aborted by operator", None)


def test_a_status_with_an_unknown_cause_is_refused(rollout_status: RolloutStatus) -> None:
    raw = rollout_status.model_dump(mode="python")
    raw["cause"] = "gremlins"
    with pytest.raises(MalformedPayloadError) as info:
        decode(msgpack.packb(raw), RolloutStatus)
    assert info.value.reason is Reason.SCHEMA
    assert "cause" in info.value.detail
