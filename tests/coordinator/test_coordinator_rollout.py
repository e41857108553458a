"""The rollout state machine, driven directly: promotion, rollback, timeout, operator
pause/resume/abort, and the wave cutoffs that go into the manifest."""

from __future__ import annotations

import itertools

import pytest

from coordinator.reasons import RolloutReason
from coordinator.rollout import (
    TRANSITIONS,
    Action,
    RolloutRecord,
    Step,
    apply,
    cutoff_bp,
    decide,
    step,
)
from schemas import Cause, Desired, Phase, UsageError, WaveCounts

T0 = 1_700_000_000.0
ACTIVE = Desired.ACTIVE


def _with(record: RolloutRecord, **changes: object) -> RolloutRecord:
    return record.model_copy(update=changes)


def _why(cause: Cause, wave: int, counts: WaveCounts) -> RolloutReason:
    return RolloutReason(cause=cause, wave=wave, counts=counts)


def _step(record: RolloutRecord, counts: WaveCounts, desired: Desired, now: float) -> RolloutRecord:
    action, reason = decide(record, counts, desired, now)
    return apply(record, action, reason, counts, now)


def test_waves_of_10_50_100_percent_cut_at_1000_5000_10000_buckets(record: RolloutRecord) -> None:
    assert [cutoff_bp(_with(record, wave=w)) for w in range(4)] == [1000, 5000, 10000, 10000]
    assert cutoff_bp(_with(record, waves_percent=(0.01, 33.33, 100.0))) == 1
    assert cutoff_bp(_with(record, waves_percent=(0.01, 33.33, 100.0), wave=1)) == 3333


@pytest.mark.parametrize(
    ("percent", "buckets"), [(0.5, 50), (0.07, 7), (1.11, 111), (2.22, 222), (33.33, 3333)]
)
def test_wave_percent_in_hundredths_cuts_at_exactly_that_many_buckets(
    record: RolloutRecord, percent: float, buckets: int
) -> None:
    """One bucket is 0.01 % of the fleet: a 0.07 % wave is 7 buckets, not 8."""
    assert cutoff_bp(_with(record, waves_percent=(percent, 100.0))) == buckets


def test_wave_with_every_targeted_device_healthy_advances_then_completes(
    record: RolloutRecord,
) -> None:
    healthy = WaveCounts(targeted=4, updated=4, healthy=4)
    now = T0 + 60.0
    for wave, cutoff in [(1, 5000), (2, 10000)]:
        action, reason = decide(record, healthy, ACTIVE, now)
        assert action is Action.ADVANCE
        assert reason == _why(Cause.PROMOTED, wave - 1, healthy)
        assert str(reason) == f"wave {wave}: 4 of 4 devices healthy"
        record = apply(record, action, reason, healthy, now)
        assert (record.phase, record.wave, cutoff_bp(record)) == (Phase.WAVE, wave, cutoff)
        assert (record.reason, record.cause) == (str(reason), Cause.PROMOTED)
        assert record.wave_started_at == now
        assert record.counts == WaveCounts()  # the next wave starts counting afresh
        now += 60.0

    action, reason = decide(record, healthy, ACTIVE, now)
    assert action is Action.COMPLETE
    assert reason == _why(Cause.PROMOTED, 2, healthy)
    assert str(reason) == "wave 3: 4 of 4 devices healthy"
    done = apply(record, action, reason, healthy, now)
    assert (done.phase, done.wave, done.cause) == (Phase.COMPLETED, 3, Cause.PROMOTED)
    assert done.phase.final
    assert cutoff_bp(done) == 10000


def test_wave_waits_until_success_ratio_of_targeted_are_healthy(record: RolloutRecord) -> None:
    lenient = _with(record, success_ratio=0.9)
    assert decide(lenient, WaveCounts(targeted=10, healthy=8), ACTIVE, T0)[0] is Action.WAIT
    assert decide(lenient, WaveCounts(targeted=10, healthy=9), ACTIVE, T0)[0] is Action.ADVANCE
    assert decide(record, WaveCounts(targeted=10, healthy=9), ACTIVE, T0)[0] is Action.WAIT


@pytest.mark.parametrize(("ratio", "targeted"), [(0.55, 100), (0.07, 100), (0.28, 25), (0.56, 50)])
def test_exactly_success_ratio_of_targeted_healthy_advances(
    record: RolloutRecord, ratio: float, targeted: int
) -> None:
    """``healthy >= success_ratio x targeted`` must hold at equality: 55 of 100 healthy
    meets a 0.55 ratio, even though 0.55 * 100 is 55.00000000000001 in floating point."""
    healthy = round(ratio * targeted)
    counts = WaveCounts(targeted=targeted, updated=targeted, healthy=healthy)
    assert decide(_with(record, success_ratio=ratio), counts, ACTIVE, T0)[0] is Action.ADVANCE


def test_wave_whose_members_are_all_offline_is_not_promoted(record: RolloutRecord) -> None:
    offline = WaveCounts(members=3)
    assert decide(record, offline, ACTIVE, T0 + 1.0) == (Action.WAIT, None)
    lenient = _with(record, success_ratio=0.01)
    assert decide(lenient, offline, ACTIVE, T0 + 1.0) == (Action.WAIT, None)


def test_early_wave_reaching_no_device_is_passed_over(record: RolloutRecord) -> None:
    action, reason = decide(record, WaveCounts(), ACTIVE, T0 + 1.0)
    assert (action, reason) == (Action.ADVANCE, _why(Cause.EMPTY_WAVE, 0, WaveCounts()))
    assert str(reason) == "wave 1: reaches no device"


def test_empty_wave_is_not_passed_over_before_the_fleet_is_known(record: RolloutRecord) -> None:
    """Right after a coordinator restart the fleet view is still filling up."""
    decision = decide(record, WaveCounts(), ACTIVE, T0 + 1.0, fleet_known=False)
    assert decision == (Action.WAIT, None)


@pytest.mark.parametrize(
    "counts",
    [
        WaveCounts(targeted=5, updated=1, unhealthy=1),  # one failure of the few seen
        WaveCounts(targeted=2, updated=2, healthy=2),  # a few healthy of many unseen
        WaveCounts(targeted=3, updated=1, healthy=1),  # past the timeout
    ],
)
def test_no_rollback_promotion_or_timeout_before_the_fleet_is_known(
    record: RolloutRecord, counts: WaveCounts
) -> None:
    """After an outage the first counts stand on whatever retained topics arrived first,
    and the clock may still include the downtime: the wave waits until the view is whole."""
    late = record.wave_started_at + 10 * record.wave_timeout_s
    assert decide(record, counts, ACTIVE, late, fleet_known=False) == (Action.WAIT, None)
    assert decide(record, counts, ACTIVE, late, fleet_known=True)[0] is not Action.WAIT
    # The operator is heard at once.
    assert decide(record, counts, Desired.ABORTED, late, fleet_known=False)[0] is (Action.ROLL_BACK)
    assert decide(record, counts, Desired.PAUSED, late, fleet_known=False)[0] is Action.PAUSE


def test_rollout_admitted_paused_starts_on_resume(record: RolloutRecord) -> None:
    held = _with(record, phase=Phase.PAUSED, started=False)
    resumed = _step(held, WaveCounts(), ACTIVE, T0 + 50.0)
    assert (resumed.phase, resumed.started, resumed.wave_started_at) == (
        Phase.WAVE,
        True,
        T0 + 50.0,
    )


def test_last_wave_reaching_no_device_never_completes(record: RolloutRecord) -> None:
    """No candidate becomes stable on no evidence: the empty last wave times out."""
    last = _with(record, wave=2)
    assert decide(last, WaveCounts(), ACTIVE, T0 + 1.0) == (Action.WAIT, None)
    action, reason = decide(last, WaveCounts(), ACTIVE, T0 + 601.0)
    assert (action, reason) == (Action.ROLL_BACK, _why(Cause.TIMED_OUT, 2, WaveCounts()))
    assert str(reason) == "wave 3: timed out with 0 of 0 healthy"


def test_one_unhealthy_of_one_reported_rolls_back_at_zero_tolerance(record: RolloutRecord) -> None:
    counts = WaveCounts(targeted=5, updated=1, unhealthy=1)
    action, reason = decide(record, counts, ACTIVE, T0 + 5.0)
    assert action is Action.ROLL_BACK
    assert reason == _why(Cause.UNHEALTHY, 0, counts)
    assert str(reason) == "wave 1: 1 of 1 reporting devices unhealthy"
    rolled = apply(record, action, reason, counts, T0 + 5.0)
    assert rolled.phase is Phase.ROLLED_BACK
    assert (rolled.reason, rolled.cause) == (str(reason), Cause.UNHEALTHY)
    assert rolled.counts == counts


def test_failures_up_to_max_failure_ratio_are_tolerated(record: RolloutRecord) -> None:
    tolerant = _with(record, max_failure_ratio=0.25, success_ratio=0.75)
    at_limit = WaveCounts(targeted=4, updated=4, healthy=3, unhealthy=1)
    over = WaveCounts(targeted=4, updated=4, healthy=2, unhealthy=2)
    assert decide(tolerant, at_limit, ACTIVE, T0)[0] is Action.ADVANCE
    assert decide(tolerant, over, ACTIVE, T0)[0] is Action.ROLL_BACK


def test_unhealthy_report_wins_over_a_healthy_majority(record: RolloutRecord) -> None:
    counts = WaveCounts(targeted=10, updated=10, healthy=10, unhealthy=1)
    assert decide(_with(record, success_ratio=0.5), counts, ACTIVE, T0)[0] is Action.ROLL_BACK


def test_wave_outliving_its_timeout_rolls_back(record: RolloutRecord) -> None:
    counts = WaveCounts(targeted=3, updated=2, healthy=2)
    deadline = record.wave_started_at + record.wave_timeout_s
    assert decide(record, counts, ACTIVE, deadline) == (Action.WAIT, None)
    action, reason = decide(record, counts, ACTIVE, deadline + 0.001)
    assert action is Action.ROLL_BACK
    assert reason == _why(Cause.TIMED_OUT, 0, counts)
    assert str(reason) == "wave 1: timed out with 2 of 3 healthy"


def test_operator_pause_holds_the_wave_and_resume_restarts_its_clock(
    record: RolloutRecord,
) -> None:
    all_healthy = WaveCounts(targeted=2, updated=2, healthy=2)
    paused = _step(record, all_healthy, Desired.PAUSED, T0 + 10.0)
    assert (paused.phase, paused.reason, paused.cause) == (
        Phase.PAUSED,
        "paused by operator",
        Cause.OPERATOR_PAUSE,
    )

    # Paused: no promotion however good the counts, and no timeout either.
    much_later = T0 + 10 * record.wave_timeout_s
    assert decide(paused, all_healthy, Desired.PAUSED, much_later) == (Action.WAIT, None)
    assert _step(paused, all_healthy, Desired.PAUSED, much_later).phase is Phase.PAUSED

    nobody_yet = WaveCounts(members=2)
    resumed = _step(paused, nobody_yet, ACTIVE, much_later)
    assert (resumed.phase, resumed.wave, resumed.wave_started_at) == (Phase.WAVE, 0, much_later)
    # A resume gives no reason of its own: the pause's stays, text and cause alike.
    assert (resumed.reason, resumed.cause) == ("paused by operator", Cause.OPERATOR_PAUSE)
    assert decide(resumed, nobody_yet, ACTIVE, much_later + 1.0) == (Action.WAIT, None)


@pytest.mark.parametrize("phase", [Phase.WAVE, Phase.PAUSED])
def test_operator_abort_rolls_back_from_a_wave_or_a_pause(
    record: RolloutRecord, phase: Phase
) -> None:
    healthy = WaveCounts(targeted=2, updated=2, healthy=2)
    action, reason = decide(_with(record, phase=phase), healthy, Desired.ABORTED, T0 + 1.0)
    assert (action, reason) == (Action.ROLL_BACK, RolloutReason(cause=Cause.OPERATOR_ABORT))
    aborted = _step(_with(record, phase=phase), healthy, Desired.ABORTED, T0 + 1.0)
    assert (aborted.phase, aborted.reason, aborted.cause) == (
        Phase.ROLLED_BACK,
        "aborted by operator",
        Cause.OPERATOR_ABORT,
    )


@pytest.mark.parametrize(
    ("phase", "action"), [p for p in itertools.product(Phase, Action) if p not in TRANSITIONS]
)
def test_action_not_allowed_in_a_phase_is_a_usage_error(
    record: RolloutRecord, phase: Phase, action: Action
) -> None:
    with pytest.raises(UsageError, match="no transition"):
        apply(_with(record, phase=phase), action, None, WaveCounts(), T0)


# -- one tick of one rollout (``step``) -----------------------------------------------


QUOTED = ("cam-1: " + "p95 latency too high " * 20, "cam-2: error rate")


def _tick(record: RolloutRecord, counts: WaveCounts, now: float = T0 + 1.0) -> object:
    def quoted() -> list[str]:
        return list(QUOTED)

    return step(record, counts, now, fleet_known=True, unhealthy=quoted, reason_chars=120)


def test_a_tick_with_nothing_new_changes_nothing(record: RolloutRecord) -> None:
    waiting = record.model_copy(update={"counts": WaveCounts(members=4, targeted=4, updated=1)})
    assert _tick(waiting, waiting.counts) is None


def test_new_counts_without_a_decision_refresh_the_record_but_are_no_transition(
    record: RolloutRecord,
) -> None:
    counts = WaveCounts(members=4, targeted=4, updated=1)
    result = _tick(record, counts)
    assert isinstance(result, Step)
    assert not result.transition
    assert (result.record.phase, result.record.counts, result.record.updated_at) == (
        Phase.WAVE,
        counts,
        T0 + 1.0,
    )


def test_a_failure_rollback_quotes_the_devices_within_the_bound(record: RolloutRecord) -> None:
    counts = WaveCounts(members=2, targeted=2, updated=2, unhealthy=1)
    result = _tick(record, counts)
    assert isinstance(result, Step)
    assert result.transition
    assert result.action is Action.ROLL_BACK
    assert result.record.phase is Phase.ROLLED_BACK
    assert result.reason is not None
    assert (result.reason.cause, result.reason.wave, result.reason.counts) == (
        Cause.UNHEALTHY,
        0,
        counts,
    )
    assert result.reason.quoted == QUOTED
    text = str(result.reason)
    assert text.startswith("wave 1: 1 of 1 reporting devices unhealthy (cam-1: p95")
    assert len(text) == 120
    assert text.endswith("…")
    assert (result.record.reason, result.record.cause) == (text, Cause.UNHEALTHY)


def test_an_abort_with_unhealthy_devices_quotes_them(record: RolloutRecord) -> None:
    aborting = _with(record, desired=Desired.ABORTED)
    result = _tick(aborting, WaveCounts(members=2, targeted=2, updated=2, healthy=1, unhealthy=1))
    assert isinstance(result, Step)
    assert result.reason is not None
    assert (result.reason.cause, result.reason.quoted) == (Cause.OPERATOR_ABORT, QUOTED)
    assert str(result.reason).startswith("aborted by operator (cam-1: p95 latency too high")


def test_a_pause_quotes_no_device(record: RolloutRecord) -> None:
    pausing = _with(record, desired=Desired.PAUSED)
    result = _tick(pausing, WaveCounts(members=2, targeted=2, updated=2, unhealthy=1))
    assert isinstance(result, Step)
    assert result.reason == RolloutReason(cause=Cause.OPERATOR_PAUSE, chars=120)
    assert str(result.reason) == "paused by operator"


def test_a_timeout_rollback_quotes_no_device(record: RolloutRecord) -> None:
    late = T0 + record.wave_timeout_s + 1.0
    result = _tick(record, WaveCounts(members=2, targeted=2), now=late)
    assert isinstance(result, Step)
    assert result.reason is not None
    assert (result.reason.cause, result.reason.quoted) == (Cause.TIMED_OUT, ())
    assert str(result.reason) == "wave 1: timed out with 0 of 2 healthy"
    assert result.record.cause is Cause.TIMED_OUT


def test_a_promotion_is_a_transition_to_the_next_wave(record: RolloutRecord) -> None:
    result = _tick(record, WaveCounts(members=1, targeted=1, updated=1, healthy=1))
    assert isinstance(result, Step)
    assert (result.action, result.record.wave, result.record.counts) == (
        Action.ADVANCE,
        1,
        WaveCounts(),
    )
    assert result.reason is not None
    assert (result.reason.cause, result.reason.quoted) == (Cause.PROMOTED, ())
    assert str(result.reason) == "wave 1: 1 of 1 devices healthy"
