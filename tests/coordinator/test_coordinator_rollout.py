"""The rollout state machine, driven directly: each class's waves (entry, pacing,
windows, clocks), promotion, silence, rollback, timeout, per-class isolation and
all-or-nothing, and the operator's pause, resume and abort."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from coordinator.rollout import (
    LANE_TRANSITIONS,
    Action,
    LaneInput,
    RolloutRecord,
    Step,
    published,
    step,
)
from coordinator.waves import percent_cutoff
from schemas import (
    Cause,
    Desired,
    LanePhase,
    MaintenanceWindow,
    Phase,
    WaveCounts,
    WaveSpec,
)
from schemas.manifest import BUCKETS
from tests.coordinator.records import CLASS, POLICY, T0, make_record, with_lane

OTHER = "intel-lowpower-detector"
HEALTHY_4 = WaveCounts(members=4, targeted=4, updated=4, healthy=4)


def _tick(
    record: RolloutRecord,
    counts: WaveCounts | dict[str, WaveCounts],
    now: float,
    *,
    known: bool = True,
    ranked: Sequence[int] = (),
    quotes: Sequence[str] = (),
) -> Step | None:
    given = counts if isinstance(counts, dict) else dict.fromkeys(record.lanes, counts)
    inputs = {
        name: LaneInput(counts=c, ranked=ranked, unhealthy=lambda: quotes)
        for name, c in given.items()
    }
    return step(record, inputs, now, fleet_known=known, reason_chars=2000)


def _after(record: RolloutRecord, counts: WaveCounts, now: float, **kw: object) -> RolloutRecord:
    result = _tick(record, counts, now, **kw)  # type: ignore[arg-type]
    assert result is not None
    return result.record


def _two_classes(**changes: Any) -> RolloutRecord:
    return make_record(classes=(CLASS, OTHER), **changes)


# -- promotion ----------------------------------------------------------------------


def test_wave_with_every_targeted_device_healthy_advances_then_completes() -> None:
    record = make_record()
    now = T0 + 60.0
    for wave in (1, 2):
        result = _tick(record, HEALTHY_4, now)
        assert result is not None
        (change,) = result.changes
        assert (change.name, change.action) == (CLASS, Action.ADVANCE)
        assert str(change.reason) == f"wave {wave}: 4 of 4 devices healthy"
        record = result.record
        lane = record.lanes[CLASS]
        # The next wave is entered with its target; its clock waits for its manifest.
        assert (lane.wave, lane.target_bp, lane.cutoff_bp) == (
            wave,
            percent_cutoff((10.0, 50.0, 100.0)[wave]),
            percent_cutoff((10.0, 50.0, 100.0)[wave]),
        )
        assert lane.published_at is None
        assert lane.counts == WaveCounts()  # the next wave starts counting afresh
        assert (record.phase, record.cause) == (Phase.WAVE, Cause.PROMOTED)
        # Not judged before its manifest is out, however healthy the counts.
        waiting = _tick(record, HEALTHY_4, now + 1.0)
        assert waiting is None or not waiting.changes
        record = published(record, now + 2.0) or record
        assert record.lanes[CLASS].published_at == now + 2.0
        now += 60.0

    result = _tick(record, HEALTHY_4, now)
    assert result is not None
    assert result.promoted == (CLASS,)
    done = result.record
    assert (done.phase, done.wave, done.lanes[CLASS].phase) == (
        Phase.COMPLETED,
        3,
        LanePhase.COMPLETED,
    )
    assert done.reason == "wave 3: 4 of 4 devices healthy"


def test_wave_waits_until_success_ratio_of_targeted_are_healthy() -> None:
    partial = WaveCounts(members=4, targeted=4, updated=4, healthy=3)
    result = _tick(make_record(), partial, T0 + 60.0)
    assert result is not None
    assert not result.transition
    assert result.record.lanes[CLASS].counts == partial


@pytest.mark.parametrize(("ratio", "targeted"), [(0.55, 100), (0.07, 100), (0.28, 25)])
def test_exactly_success_ratio_of_targeted_healthy_advances(ratio: float, targeted: int) -> None:
    record = make_record(policy=POLICY.model_copy(update={"success_ratio": ratio}))
    healthy = round(ratio * targeted)
    counts = WaveCounts(members=targeted, targeted=targeted, healthy=healthy)
    result = _tick(record, counts, T0 + 1.0)
    assert result is not None
    assert result.changes[0].action is Action.ADVANCE


def test_no_promotion_before_the_waves_minimum_soak() -> None:
    record = make_record(waves_percent=(10.0, 100.0))
    record = record.model_copy(
        update={"waves": (WaveSpec(percent=10.0, min_soak_s=300.0), WaveSpec(percent=100.0))}
    )
    early = _tick(record, HEALTHY_4, T0 + 299.0)
    assert early is None or not early.changes
    late = _tick(record, HEALTHY_4, T0 + 300.0)
    assert late is not None
    assert late.changes[0].action is Action.ADVANCE


def test_a_waves_own_ratios_and_timeout_override_the_policy() -> None:
    record = make_record(waves_percent=(10.0, 100.0)).model_copy(
        update={
            "waves": (
                WaveSpec(percent=10.0, success_ratio=0.5, timeout_s=30.0),
                WaveSpec(percent=100.0),
            )
        }
    )
    half = WaveCounts(members=4, targeted=4, healthy=2)
    assert _after(record, half, T0 + 1.0).lanes[CLASS].wave == 1
    none = WaveCounts(members=4, targeted=4)
    timed_out = _after(record, none, T0 + 31.0)
    assert (timed_out.phase, timed_out.cause) == (Phase.ROLLED_BACK, Cause.TIMED_OUT)


# -- empty and offline waves ------------------------------------------------------------


def test_early_wave_with_nobody_to_ask_is_passed_over() -> None:
    offline = WaveCounts(members=3, pending=3)
    result = _tick(make_record(), offline, T0 + 1.0)
    assert result is not None
    (change,) = result.changes
    assert (change.action, change.reason and change.reason.cause) == (
        Action.ADVANCE,
        Cause.EMPTY_WAVE,
    )
    assert str(change.reason) == "wave 1: no device to ask (3 offline)"


def test_last_wave_with_nobody_to_ask_never_completes_and_times_out() -> None:
    record = make_record(wave=2)
    assert not (_tick(record, WaveCounts(members=2, pending=2), T0 + 599.0) or Step(record)).changes
    rolled = _after(record, WaveCounts(members=2, pending=2), T0 + 601.0)
    assert (rolled.phase, rolled.cause) == (Phase.ROLLED_BACK, Cause.TIMED_OUT)


def test_nothing_but_the_operator_acts_before_the_fleet_is_known() -> None:
    record = make_record()
    for counts in (HEALTHY_4, WaveCounts(members=1, targeted=1, unhealthy=1), WaveCounts()):
        result = _tick(record, counts, T0 + 10_000.0, known=False)
        assert result is None or not result.changes
    aborted = _after(
        record.model_copy(update={"desired": Desired.ABORTED}), WaveCounts(), T0, known=False
    )
    assert aborted.phase is Phase.ROLLED_BACK


# -- failure and silence ----------------------------------------------------------------


def test_one_unhealthy_of_one_judged_rolls_back_at_zero_tolerance_quoting_it() -> None:
    counts = WaveCounts(members=4, targeted=4, healthy=3, unhealthy=1)
    result = _tick(make_record(), counts, T0 + 1.0, quotes=("cam-3: p95_latency_ms:35>10",))
    assert result is not None
    record = result.record
    assert (record.phase, record.cause) == (Phase.ROLLED_BACK, Cause.UNHEALTHY)
    assert record.reason == (
        "wave 1: 1 of 4 reporting devices unhealthy (cam-3: p95_latency_ms:35>10)"
    )
    assert result.promoted == ()


def test_silent_devices_count_as_failed() -> None:
    """A targeted device that went silent fails the wave as an unhealthy one would: the
    failure that passes when only online devices are counted."""
    counts = WaveCounts(members=4, targeted=4, healthy=3, silent=1)
    record = _after(make_record(), counts, T0 + 1.0)
    assert (record.phase, record.cause) == (Phase.ROLLED_BACK, Cause.SILENT)
    assert record.reason == "wave 1: 1 of 4 targeted devices silent"


def test_failures_up_to_max_failure_ratio_are_tolerated() -> None:
    record = make_record(
        policy=POLICY.model_copy(update={"max_failure_ratio": 0.25, "success_ratio": 0.5})
    )
    counts = WaveCounts(members=4, targeted=4, healthy=3, silent=1)
    assert _after(record, counts, T0 + 1.0).lanes[CLASS].wave == 1
    worse = WaveCounts(members=4, targeted=4, healthy=2, unhealthy=1, silent=1)
    assert _after(record, worse, T0 + 1.0).phase is Phase.ROLLED_BACK


def test_failure_is_judged_even_before_the_waves_manifest_is_out() -> None:
    record = with_lane(make_record(), published_at=None)
    counts = WaveCounts(members=2, targeted=2, healthy=1, unhealthy=1)
    assert _after(record, counts, T0 + 1.0).phase is Phase.ROLLED_BACK


# -- per-class isolation ----------------------------------------------------------------


def test_one_class_failing_rolls_back_only_that_class() -> None:
    record = _two_classes()
    bad = WaveCounts(members=2, targeted=2, unhealthy=1, healthy=1)
    result = _tick(record, {CLASS: bad, OTHER: HEALTHY_4}, T0 + 1.0)
    assert result is not None
    after = result.record
    assert after.lanes[CLASS].phase is LanePhase.ROLLED_BACK
    assert (after.lanes[OTHER].phase, after.lanes[OTHER].wave) == (LanePhase.WAVE, 1)
    assert after.phase is Phase.WAVE
    assert after.reason is not None
    assert after.reason.startswith(f"{OTHER}: ")
    # The other class goes on to complete; the rollout ends rolled back, not completed.
    other = after.lanes[OTHER]
    last = after.model_copy(
        update={
            "lanes": {
                **after.lanes,
                OTHER: other.model_copy(
                    update={"wave": 2, "published_at": T0, "target_bp": BUCKETS}
                ),
            }
        }
    )
    final = _tick(last, {OTHER: HEALTHY_4}, T0 + 2.0)
    assert final is not None
    assert final.promoted == (OTHER,)
    assert final.record.phase is Phase.ROLLED_BACK
    assert final.record.lanes[OTHER].phase is LanePhase.COMPLETED


def test_all_or_nothing_rolls_every_class_back_with_the_one_that_failed() -> None:
    record = _two_classes(all_or_nothing=True)
    bad = WaveCounts(members=2, targeted=2, unhealthy=1, healthy=1)
    result = _tick(record, {CLASS: bad, OTHER: HEALTHY_4}, T0 + 1.0)
    assert result is not None
    assert result.record.phase is Phase.ROLLED_BACK
    assert result.record.lanes[OTHER].cause is Cause.OTHER_CLASS_FAILED
    assert result.promoted == ()


def test_all_or_nothing_promotes_no_class_before_every_class_passed() -> None:
    record = _two_classes(all_or_nothing=True, wave=2)
    result = _tick(record, {CLASS: HEALTHY_4, OTHER: WaveCounts(members=4, targeted=4)}, T0 + 1)
    assert result is not None
    assert result.promoted == ()
    assert result.record.lanes[CLASS].phase is LanePhase.PASSED
    both = _tick(result.record, {CLASS: HEALTHY_4, OTHER: HEALTHY_4}, T0 + 2)
    assert both is not None
    assert set(both.promoted) == {CLASS, OTHER}
    assert both.record.phase is Phase.COMPLETED


# -- pacing and windows -----------------------------------------------------------------


def _entering(record: RolloutRecord) -> RolloutRecord:
    """``record`` with its class about to enter its first wave (just admitted)."""
    return with_lane(record, target_bp=None, cutoff_bp=0, published_at=None, entered_at=T0)


def test_a_count_wave_reaches_the_first_devices_by_bucket() -> None:
    ranked = [5, 40, 41, 700, 9000]
    record = _entering(make_record()).model_copy(
        update={"waves": (WaveSpec(count=2), WaveSpec(percent=100.0))}
    )
    lane = _after(record, WaveCounts(), T0, ranked=ranked).lanes[CLASS]
    assert (lane.target_bp, lane.cutoff_bp) == (41, 41)  # buckets 5 and 40


def test_a_paced_wave_raises_its_cutoff_at_the_rate_and_starts_its_clock_at_the_target() -> None:
    ranked = list(range(0, 1000, 10))  # 100 devices below the 10 % cutoff
    record = _after(_entering(make_record(rate_per_min=20)), WaveCounts(), T0, ranked=ranked)
    lane = record.lanes[CLASS]
    assert (lane.target_bp, lane.cutoff_bp) == (1000, 0)
    assert lane.waiting == "paced at 20/min: 0 of 100 devices reached"
    record = _after(record, WaveCounts(), T0 + 90.0, ranked=ranked)
    lane = record.lanes[CLASS]
    assert lane.cutoff_bp == 300  # 30 devices in 90 s
    assert published(record, T0 + 90.0) is None  # the target is not out yet: no clock
    record = _after(record, WaveCounts(), T0 + 300.0, ranked=ranked)
    assert record.lanes[CLASS].cutoff_bp == 1000
    assert record.lanes[CLASS].waiting is None
    started = published(record, T0 + 301.0)
    assert started is not None
    assert started.lanes[CLASS].published_at == T0 + 301.0


def test_a_class_outside_its_window_is_not_newly_targeted() -> None:
    day = 20_000 * 86_400.0
    window = MaintenanceWindow(start_minute=120, end_minute=240)
    record = _entering(make_record(windows={CLASS: window}))
    closed = _after(record, WaveCounts(), day + 60.0).lanes[CLASS]
    assert (closed.cutoff_bp, closed.waiting) == (
        0,
        "outside its maintenance window 02:00-04:00 UTC",
    )
    opened = _after(record, WaveCounts(), day + 150 * 60.0).lanes[CLASS]
    assert (opened.cutoff_bp, opened.waiting) == (1000, None)


def test_a_moved_cutoff_or_clock_is_stored_though_nothing_was_decided() -> None:
    record = _entering(make_record())
    result = _tick(record, WaveCounts(), T0)
    assert result is not None
    assert not result.changes
    assert result.transition  # stored before a manifest shows the new cutoff


# -- the operator ---------------------------------------------------------------------


def test_operator_pause_holds_every_class_and_resume_restarts_their_clocks() -> None:
    record = make_record(desired=Desired.PAUSED)
    paused = _after(record, WaveCounts(), T0 + 10.0)
    assert (paused.phase, paused.cause) == (Phase.PAUSED, Cause.OPERATOR_PAUSE)
    held = _tick(paused, HEALTHY_4, T0 + 10_000.0)
    assert held is None or not held.changes
    resumed = _after(
        paused.model_copy(update={"desired": Desired.ACTIVE}), WaveCounts(), T0 + 500.0
    )
    assert resumed.phase is Phase.WAVE
    assert resumed.lanes[CLASS].published_at == T0 + 500.0


def test_rollout_admitted_paused_starts_on_resume() -> None:
    record = make_record(phase=Phase.PAUSED, started=False)
    resumed = _after(record, WaveCounts(), T0 + 1.0)
    assert (resumed.phase, resumed.started) == (Phase.WAVE, True)


@pytest.mark.parametrize("phase", [Phase.WAVE, Phase.PAUSED])
def test_operator_abort_rolls_every_live_class_back(phase: Phase) -> None:
    record = _two_classes(phase=phase, desired=Desired.ABORTED)
    record = with_lane(record, OTHER, phase=LanePhase.COMPLETED)
    result = _tick(record, WaveCounts(), T0 + 1.0)
    assert result is not None
    after = result.record
    assert (after.phase, after.cause, after.reason) == (
        Phase.ROLLED_BACK,
        Cause.OPERATOR_ABORT,
        "aborted by operator",
    )
    assert after.lanes[CLASS].phase is LanePhase.ROLLED_BACK
    assert after.lanes[OTHER].phase is LanePhase.COMPLETED  # already promoted: stays


def test_lane_transitions_not_in_the_table_are_refused() -> None:
    assert (LanePhase.COMPLETED, Action.ROLL_BACK) not in LANE_TRANSITIONS
    assert (LanePhase.PASSED, Action.ADVANCE) not in LANE_TRANSITIONS


def test_a_tick_with_nothing_new_changes_nothing() -> None:
    waiting = WaveCounts(members=2, targeted=2, healthy=1)
    record = with_lane(make_record(), counts=waiting)
    assert _tick(record, waiting, T0 + 1.0) is None


def test_a_record_stored_before_lanes_loads_with_one_lane_per_class() -> None:
    old = {
        "id": "r1",
        "generation": 2,
        "spec": b"x",
        "classes": [CLASS, OTHER],
        "candidates": {},
        "waves_percent": [10.0, 100.0],
        "canaries": [],
        "success_ratio": 0.9,
        "max_failure_ratio": 0.1,
        "wave_timeout_s": 300.0,
        "phase": "wave",
        "wave": 1,
        "wave_started_at": T0,
        "counts": {"members": 3},
        "updated_at": T0,
    }
    record = RolloutRecord.model_validate(old)
    assert set(record.lanes) == {CLASS, OTHER}
    lane = record.lanes[CLASS]
    assert (lane.wave, lane.published_at, lane.policy.success_ratio) == (1, T0, 0.9)
    assert record.waves == (WaveSpec(percent=10.0), WaveSpec(percent=100.0))
