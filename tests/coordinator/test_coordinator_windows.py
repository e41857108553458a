"""The parts of the fleet telemetry engine, one rule per test: rolling windows that sum
their buckets and forget what rolled out, quantiles of merged histograms, the drift
measures, hysteresis and health against a budget, and bounds under hostile summaries."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from coordinator.alerts import Alarm, judge_health
from coordinator.drift import DriftPolicy, judge_drift, ks_distance, label_bins, psi
from coordinator.windows import LATENCY_MAX_INDEX, LATENCY_MIN_INDEX, Ring, Tally, bucket_ms
from schemas import HealthBudget, LogHistogram, TelemetrySummary
from schemas.telemetry import OTHER_LABEL, latency_bucket
from tests.coordinator.summaries import T0, window

BUDGET = HealthBudget(max_error_rate=0.01, p95_latency_ms=10.0, min_inferences=100, soak_seconds=5)


def minute() -> Ring:
    return Ring(10.0, 6)


def piece(summary: TelemetrySummary, labels_kept: int = 256) -> Tally:
    """``summary`` counted into a tally of its own."""
    tally = Tally()
    tally.count_summary(summary, labels_kept)
    return tally


def test_a_window_sums_its_buckets_and_forgets_each_as_it_rolls_out() -> None:
    ring = minute()
    for offset in (0.0, 15.0, 35.0, 55.0):
        assert ring.add(T0 + offset, piece(window(count=10, errors=1)), now=T0 + 55.0)
    assert (ring.total.count, ring.total.errors) == (40, 4)
    ring.advance(T0 + 65.0)  # the bucket of T0 .. T0+10 left the window
    assert (ring.total.count, ring.total.errors) == (30, 3)
    assert ring.total.labels == dict(Counter({str(d): 3 for d in range(9)}))
    ring.advance(T0 + 200.0)
    assert (ring.total.count, ring.total.latency, ring.total.labels) == (0, {}, {})
    assert ring.total.confidence == [0] * 10


def test_a_slot_reused_by_a_newer_bucket_takes_the_old_one_off_first() -> None:
    ring = minute()
    ring.add(T0, piece(window(count=10)), now=T0)
    ring.add(T0 + 60.0, piece(window(count=7)), now=T0 + 60.0)  # the same slot, 6 later
    assert ring.total.count == 7


def test_a_summary_from_before_the_window_is_refused_and_counts_nothing() -> None:
    ring = minute()
    assert not ring.add(T0 - 60.0, piece(window(count=10)), now=T0)
    assert ring.total.count == 0


def test_quantiles_of_merged_windows_are_those_of_the_merged_histograms() -> None:
    """Two devices, one fast and one slow: the window's quantiles are read from the
    merge of their histograms, exactly as the schema's own quantile reads it."""
    fast = window("cam-1", count=90, latency_ms=(0.5, 0.6, 0.7))
    slow = window("cam-2", count=10, latency_ms=(30.0, 45.0))
    tally = piece(fast)
    tally.add(piece(slow))
    merged = fast.latency_ms.merge(slow.latency_ms)
    found = tally.quantiles(0.5, 0.95, 0.99)
    expected = (merged.quantile(0.5), merged.quantile(0.95), merged.quantile(0.99))
    assert tuple(None if i is None else bucket_ms(i) for i in found) == expected
    assert Tally().quantiles(0.5) == (None,)


def test_hostile_numbers_are_clamped_to_what_an_agent_can_send() -> None:
    """Errors above the count, negative bins and labels, latency buckets of 10^-300 ms
    and 10^300 ms: clamped, so nothing overflows and no dictionary grows past the
    latency range."""
    hostile = TelemetrySummary(
        summary_id="x",
        device_id="cam-1",
        release="r",
        window_start=T0,
        window_end=T0,
        count=5,
        errors=50,
        latency_ms=LogHistogram(buckets=((-(10**6), 3), (-5, 1), (10**6, 2))),
        confidence=(-100, 1, 0, 0, 0, 0, 0, 0, 0, 4),
        labels={"a": -3, "b": 2},
    )
    part = piece(hostile)
    assert (part.count, part.errors) == (5, 5)
    assert part.latency == {LATENCY_MIN_INDEX: 3, -5: 1, LATENCY_MAX_INDEX: 2}
    assert part.confidence == [0, 1, 0, 0, 0, 0, 0, 0, 0, 4]
    assert part.labels == {"b": 2}
    assert all(math.isfinite(bucket_ms(i)) for i in part.quantiles(0.0, 0.5, 1.0) if i is not None)


def test_a_flood_of_labels_is_counted_whole_under_a_bounded_vocabulary() -> None:
    ring = Ring(60.0, 60)
    sent = 0
    for batch in range(20):
        labels = {f"junk-{batch}-{i}": 1 + i % 3 for i in range(200)}
        sent += sum(labels.values())
        arrived = piece(window(labels=labels), labels_kept=100)
        assert len(arrived.labels) <= 100
        ring.add(T0, arrived.relabelled(ring.total, 50), now=T0)
    assert len(ring.total.labels) == 50
    assert OTHER_LABEL in ring.total.labels
    assert sum(ring.total.labels.values()) == sent


def test_labels_leave_the_vocabulary_when_they_leave_the_window() -> None:
    ring = minute()
    ring.add(T0, piece(window(labels={"a": 1, "b": 1})).relabelled(ring.total, 3), now=T0)
    late = piece(window(labels={"c": 1}))
    assert late.relabelled(ring.total, 3).labels == {OTHER_LABEL: 1}
    ring.advance(T0 + 70.0)
    assert late.relabelled(ring.total, 3).labels == {"c": 1}


# -- drift ------------------------------------------------------------------------------


def test_psi_is_zero_for_the_same_shape_and_large_for_a_collapse() -> None:
    reference = [5, 10, 20, 40, 25]
    assert psi(reference, reference) == pytest.approx(0.0, abs=1e-12)
    scaled = psi(reference, [n * 30 for n in reference])  # only the smoothing differs
    assert scaled is not None
    assert scaled < 0.01
    collapsed = [0, 0, 0, 0, 100]
    assert psi(reference, collapsed) is not None
    assert psi(reference, collapsed) > 1.0  # type: ignore[operator]
    assert psi([0] * 5, collapsed) is None
    assert psi(reference, [0] * 5) is None


def test_psi_stays_finite_when_a_bin_is_empty_on_one_side() -> None:
    value = psi([100, 0], [0, 100])
    assert value is not None
    assert math.isfinite(value)


def test_ks_distance_is_the_largest_gap_between_the_cumulative_shares() -> None:
    assert ks_distance([1, 1, 0, 0], [0, 0, 1, 1]) == pytest.approx(1.0)
    assert ks_distance([1, 1, 1, 1], [2, 2, 2, 2]) == pytest.approx(0.0)
    assert ks_distance([1, 0, 0, 1], [0, 1, 1, 0]) == pytest.approx(0.5)


def test_labels_are_compared_on_the_references_top_labels_and_one_bin_for_the_rest() -> None:
    reference = {"cat": 50, "dog": 30, "owl": 5, OTHER_LABEL: 15}
    window_labels = {"cat": 10, "emu": 40, OTHER_LABEL: 2}
    ref, win = label_bins(reference, window_labels, top=2)
    assert ref == [50, 30, 20]
    assert win == [10, 0, 42]


def _tally_of(**labels: int) -> Tally:
    return piece(window(count=sum(labels.values()), labels=labels))


def test_drift_is_judged_on_the_shortest_window_that_holds_enough() -> None:
    policy = DriftPolicy(min_inferences=100, reference_inferences=100)
    reference = _tally_of(a=500, b=500)
    short, long = minute(), Ring(60.0, 60)
    part = piece(window(count=60, labels={"a": 60}))
    for ring in (short, long):
        ring.add(T0, part, now=T0)
    assert (
        judge_drift(policy, reference, (short, long), clear_ratio=0.8, labels_compared=32) is None
    )
    long.add(T0 - 120.0, piece(window(count=60, labels={"b": 60})), now=T0)
    measure = judge_drift(policy, reference, (short, long), clear_ratio=0.8, labels_compared=32)
    assert measure is not None
    assert measure.window_s == 3600.0
    short.add(T0, part, now=T0)
    measure = judge_drift(policy, reference, (short, long), clear_ratio=0.8, labels_compared=32)
    assert measure is not None
    assert measure.window_s == 60.0
    assert measure.over  # only a's in the last minute
    assert measure.labels_psi is not None
    assert measure.labels_psi > policy.psi


def test_drift_within_the_threshold_neither_raises_nor_clears_between_the_two() -> None:
    policy = DriftPolicy(psi=0.25, min_inferences=10, reference_inferences=10)
    reference = _tally_of(a=500, b=500)
    ring = minute()
    ring.add(T0, piece(window(count=100, labels={"a": 50, "b": 50})), now=T0)
    same = judge_drift(policy, reference, (ring,), clear_ratio=0.8, labels_compared=32)
    assert same is not None
    assert (same.over, same.clear) == (False, True)


def test_a_ks_limit_raises_drift_on_confidences_alone() -> None:
    reference = piece(window(count=1000, confidence=(0,) * 5 + (200,) * 5))
    ring = minute()
    ring.add(T0, piece(window(count=1000, confidence=(0,) * 4 + (250, 0, 250, 250, 0, 250))), T0)
    plain = DriftPolicy(psi=5.0, min_inferences=10, reference_inferences=10)
    with_ks = DriftPolicy(psi=5.0, ks=0.2, min_inferences=10, reference_inferences=10)
    measured = judge_drift(plain, reference, (ring,), clear_ratio=0.8, labels_compared=32)
    assert measured is not None
    assert not measured.over
    assert measured.confidence_ks is not None
    assert measured.confidence_ks > 0.2
    measured = judge_drift(with_ks, reference, (ring,), clear_ratio=0.8, labels_compared=32)
    assert measured is not None
    assert measured.over


# -- alarms and health ----------------------------------------------------------------------


def test_an_alarm_has_hysteresis_between_its_raise_and_clear_levels() -> None:
    alarm = Alarm()
    alarm.judge(over=False, clear=False, now=1.0, detail="near")
    assert not alarm.raised
    alarm.judge(over=True, clear=False, now=2.0, detail="over")
    assert (alarm.raised, alarm.since, alarm.detail) == (True, 2.0, "over")
    alarm.judge(over=False, clear=False, now=3.0, detail="just under")
    assert (alarm.raised, alarm.detail) == (True, "over")
    alarm.judge(over=False, clear=True, now=4.0, detail="well under")
    assert (alarm.raised, alarm.since, alarm.detail) == (False, None, "well under")


def test_an_alarm_is_told_at_most_once_per_gap_with_every_change_since() -> None:
    alarm = Alarm()
    alarm.judge(over=True, clear=False, now=0.0, detail="over")
    assert alarm.due(0.0, gap_s=60.0) == 1
    alarm.judge(over=False, clear=True, now=10.0, detail="under")
    alarm.judge(over=True, clear=False, now=20.0, detail="over again")
    assert alarm.due(30.0, gap_s=60.0) == 0
    assert alarm.due(60.0, gap_s=60.0) == 2
    assert alarm.due(200.0, gap_s=60.0) == 0  # nothing new


def _health_ring(count: int, errors: int, latency_ms: float) -> Ring:
    ring = minute()
    ring.add(T0, piece(window(count=count, errors=errors, latency_ms=(latency_ms,))), now=T0)
    return ring


def test_health_is_not_judged_below_the_budgets_minimum_inferences() -> None:
    assert judge_health(BUDGET, (_health_ring(99, 99, 1.0),), clear_ratio=0.8) is None


def test_an_error_rate_over_budget_is_a_breach() -> None:
    measure = judge_health(BUDGET, (_health_ring(200, 10, 1.0),), clear_ratio=0.8)
    assert measure is not None
    assert measure.over
    assert measure.reasons == ("error_rate:0.050>0.010",)


def test_a_p95_in_the_bucket_of_the_budget_is_no_breach_one_bucket_above_is() -> None:
    """Buckets are 10 % wide: a p95 whose bucket holds the budget may be within it."""
    at_budget = judge_health(BUDGET, (_health_ring(200, 0, 10.0),), clear_ratio=0.8)
    assert at_budget is not None
    assert not at_budget.over
    assert not at_budget.clear  # nor clearly below it
    above = bucket_ms(latency_bucket(10.0)) * 1.05  # in the next bucket
    over = judge_health(BUDGET, (_health_ring(200, 0, above),), clear_ratio=0.8)
    assert over is not None
    assert over.over
    assert over.reasons[0].startswith("p95_latency_ms:")
    fine = judge_health(BUDGET, (_health_ring(200, 1, 2.0),), clear_ratio=0.8)
    assert fine is not None
    assert (fine.over, fine.clear) == (False, True)
