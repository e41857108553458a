"""The fleet telemetry engine (``coordinator.aggregate.Aggregator``), one rule per test:
what it follows, how its windows roll, where a release's reference comes from, when drift
and health alerts are raised, told and cleared, and what it costs under hostile input."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from coordinator.aggregate import AggregateSettings, Aggregator, Named, Tick
from coordinator.alerts import AlertKind
from coordinator.drift import DriftPolicy
from schemas import (
    MAX_MESSAGE_BYTES,
    ClassTelemetry,
    ReferenceSource,
    ReleaseRole,
    ReleaseTelemetry,
    decode,
    encode,
)
from schemas.classtelemetry import MAX_LABELS_SHOWN, MAX_RELEASES
from schemas.telemetry import MAX_LABEL_CHARS, OTHER_LABEL
from tests.coordinator.records import CLASS, make_release
from tests.coordinator.summaries import window

START = 1_700_000_040.0
"""A whole minute: buckets of 10 s and 1 min both begin here."""
OTHER_CLASS = "intel-lowpower-detector"
RELEASE = make_release().release_id
BUDGET = make_release().health  # error rate 0.01, p95 40 ms, 20 inferences
POLICY = DriftPolicy(min_inferences=200, reference_inferences=500)
SHIFTED = {"7": 100}
"""Every answer the same label: a camera that sees nothing but one thing."""


def engine(**settings: Any) -> Aggregator:
    return Aggregator(
        {CLASS: POLICY, OTHER_CLASS: DriftPolicy()}, AggregateSettings(**settings), now=START
    )


def named(role: ReleaseRole, release: str = RELEASE, rollout: str | None = "r1") -> Any:
    return {
        CLASS: {release: Named(role, BUDGET, rollout if role is ReleaseRole.CANDIDATE else None)}
    }


def feed(agg: Aggregator, at: float, devices: int = 10, **fields: Any) -> None:
    for n in range(devices):
        assert agg.add(CLASS, window(f"cam-{n:04d}", end=at, **fields), now=at)


def shown(tick: Tick, release: str = RELEASE) -> ReleaseTelemetry:
    return next(r for r in tick.classes[CLASS].releases if r.release == release)


def test_many_devices_add_up_per_release_and_the_minute_rolls_before_the_hour() -> None:
    agg = engine()
    agg.name(named(ReleaseRole.STABLE))
    sent: Counter[str] = Counter()
    for offset in (5.0, 15.0, 25.0):
        feed(agg, START + offset, errors=1)
        sent.update({k: 10 * n for k, n in window(errors=1).labels.items()})
    now = shown(agg.tick(START + 30.0))
    assert (now.minute.inferences, now.minute.errors) == (3000, 30)
    assert now.hour.inferences == 3000
    assert now.minute.rate_per_s == 3000 / 30.0  # watched for 30 s so far
    assert now.minute.error_rate == 0.01
    assert now.minute.labels == sent
    assert now.minute.p95_ms is not None
    later = shown(agg.tick(START + 75.0))  # the buckets of +5 and +15 left the minute
    assert (later.minute.inferences, later.hour.inferences) == (1000, 3000)
    assert later.minute.rate_per_s == 1000 / 60.0
    gone = shown(agg.tick(START + 3700.0))
    assert (gone.minute.inferences, gone.hour.inferences, gone.hour.error_rate) == (0, 0, None)


def test_only_named_releases_are_followed_and_the_rest_is_counted_not_kept() -> None:
    agg = engine()
    agg.name(named(ReleaseRole.STABLE))
    assert not agg.add(CLASS, window(release="made-up@000000000000", end=START), now=START)
    assert not agg.add("no-such-class", window(end=START), now=START)
    assert not agg.add(None, window(end=START), now=START)
    assert not agg.add(CLASS, window(release=None, end=START), now=START)
    assert agg.releases(CLASS) == []
    snapshot = agg.tick(START + 1.0).classes[CLASS]
    assert (snapshot.releases, snapshot.unattributed) == ((), 100)
    stats = agg.stats
    assert (stats.unattributed, stats.unclassed, stats.no_release, stats.added) == (1, 2, 1, 0)
    assert OTHER_CLASS not in agg.tick(START + 2.0).classes  # nothing to show there yet


def test_a_summary_counts_at_its_end_never_in_the_future_and_a_late_one_only_for_reference() -> (
    None
):
    agg = engine()
    agg.name(named(ReleaseRole.STABLE))
    assert agg.add(CLASS, window(end=START + 10_000.0), now=START)  # a clock ahead: now
    assert agg.add(CLASS, window(end=START - 7200.0), now=START)  # too late for a window
    assert agg.add(CLASS, window(end=math.nan), now=START)
    now = shown(agg.tick(START))
    assert (now.minute.inferences, now.hour.inferences) == (200, 200)
    assert now.drift.reference_inferences == 300
    assert agg.stats.late == 1


def test_a_class_follows_at_most_its_releases_and_a_new_one_replaces_the_past() -> None:
    agg = engine(releases_kept=2)
    releases = [f"digits-v{n}:fp32@{n:012d}" for n in range(3)]
    for release in releases[:2]:
        agg.name(named(ReleaseRole.CANDIDATE, release))
        feed(agg, START, devices=1, release=release)
    agg.name(named(ReleaseRole.STABLE, releases[0]))  # [1] was rolled back: past
    feed(agg, START + 5.0, devices=1, release=releases[0])
    agg.name({CLASS: {r: Named(ReleaseRole.STABLE, BUDGET) for r in (releases[0], releases[2])}})
    feed(agg, START + 10.0, devices=1, release=releases[2])
    assert sorted(agg.releases(CLASS)) == [releases[0], releases[2]]
    agg.name({CLASS: {r: Named(ReleaseRole.STABLE, BUDGET) for r in releases}})
    assert not agg.add(CLASS, window(release=releases[1], end=START + 20.0), now=START + 20.0)


def test_a_past_release_is_shown_while_heard_from_and_dropped_an_hour_after() -> None:
    agg = engine()
    agg.name(named(ReleaseRole.CANDIDATE))
    feed(agg, START)
    agg.name({})  # rolled back: no longer named
    assert shown(agg.tick(START + 30.0)).role is ReleaseRole.PAST
    feed(agg, START + 60.0)  # devices not yet back on the stable
    assert RELEASE in agg.releases(CLASS)
    agg.tick(START + 60.0 + 3599.0)
    assert RELEASE in agg.releases(CLASS)
    assert agg.tick(START + 60.0 + 3600.0).classes[CLASS].releases == ()


def test_the_reference_is_what_the_rollout_saw_once_it_ended_with_enough() -> None:
    agg = engine()
    agg.name(named(ReleaseRole.CANDIDATE))
    feed(agg, START, devices=3)
    during = shown(agg.tick(START + 1.0)).drift
    assert (during.reference, during.reference_inferences) == (None, 300)
    agg.name(named(ReleaseRole.STABLE))  # promoted: the rollout ended, with 300 < 500
    assert shown(agg.tick(START + 2.0)).drift.reference is None
    feed(agg, START + 5.0, devices=3)
    fixed = shown(agg.tick(START + 6.0)).drift
    assert (fixed.reference, fixed.reference_inferences) == (ReferenceSource.ROLLOUT, 600)
    feed(agg, START + 7.0, devices=3)
    assert shown(agg.tick(START + 8.0)).drift.reference_inferences == 600  # fixed


def test_a_release_not_rolled_out_here_takes_its_first_hour_as_reference() -> None:
    agg = engine()
    agg.name(named(ReleaseRole.STABLE))
    feed(agg, START)
    assert shown(agg.tick(START + 3599.0)).drift.reference is None
    fixed = shown(agg.tick(START + 3600.0)).drift
    assert fixed.reference is ReferenceSource.FIRST_HOUR


def _rolled_out(agg: Aggregator) -> None:
    """A rollout of ``RELEASE`` seen by 10 devices, promoted: its reference fixed."""
    agg.name(named(ReleaseRole.CANDIDATE))
    feed(agg, START)
    agg.name(named(ReleaseRole.STABLE))
    assert shown(agg.tick(START + 1.0)).drift.reference is ReferenceSource.ROLLOUT


def test_labels_shifted_after_the_rollout_raise_one_drift_alert_and_clear_it_later() -> None:
    agg = engine()
    _rolled_out(agg)
    feed(agg, START + 70.0, devices=3)  # a normal minute: no drift
    calm = agg.tick(START + 75.0)
    assert calm.alerts == []
    assert not shown(calm).drift.alert
    feed(agg, START + 130.0, devices=3, labels=SHIFTED)
    drifted = agg.tick(START + 135.0)
    status = shown(drifted).drift
    assert status.alert
    assert status.since == START + 135.0
    assert status.window_s == 60.0
    assert status.labels_psi is not None
    assert status.labels_psi > POLICY.psi
    [alert] = drifted.alerts
    assert (alert.kind, alert.event, alert.rollout_id, alert.changes) == (
        AlertKind.DRIFT,
        "drift",
        "r1",
        1,
    )
    assert RELEASE in alert.detail
    assert "labels PSI" in alert.detail
    feed(agg, START + 140.0, devices=3, labels=SHIFTED)
    assert agg.tick(START + 145.0).alerts == []  # still drifted: told once
    feed(agg, START + 250.0, devices=3)  # the scene is back to normal
    cleared = agg.tick(START + 255.0)
    assert not shown(cleared).drift.alert
    assert [a.event for a in cleared.alerts] == ["drift_cleared"]


def test_drift_is_judged_on_the_hour_when_the_minute_holds_too_few() -> None:
    agg = engine()
    _rolled_out(agg)
    feed(agg, START + 70.0, devices=1, labels=SHIFTED)  # 100 answers: too few for a minute
    status = shown(agg.tick(START + 75.0)).drift
    assert status.window_s == 3600.0
    assert not status.alert  # a few odd answers in an hour of normal ones
    assert shown(agg.tick(START + 7200.0)).drift.window_s is None  # nothing left to judge


def test_a_health_breach_after_the_soak_is_raised_kept_in_between_and_cleared() -> None:
    agg = engine(audit_gap_s=0.0)
    agg.name(named(ReleaseRole.STABLE))
    feed(agg, START + 5.0, devices=2, errors=5)  # 5 %, budget 1 %
    breached = agg.tick(START + 6.0)
    health = shown(breached).health
    assert health.breach
    assert health.reasons == ("error_rate:0.050>0.010",)
    assert [a.event for a in breached.alerts] == ["health_breach"]
    feed(agg, START + 100.0, devices=10, errors=1, count=111)  # 0.9 %: between
    between = agg.tick(START + 101.0)
    assert shown(between).health.breach
    assert between.alerts == []
    feed(agg, START + 200.0, devices=2)  # no errors
    back = agg.tick(START + 201.0)
    assert not shown(back).health.breach
    assert [a.event for a in back.alerts] == ["health_recovered"]


def test_health_needs_the_budgets_inferences_in_a_window() -> None:
    agg = engine()
    agg.name(named(ReleaseRole.STABLE))
    feed(agg, START, devices=1, count=19, errors=19)
    tick = agg.tick(START + 1.0)
    assert not shown(tick).health.breach
    assert shown(tick).health.window_s is None
    assert tick.alerts == []


def test_a_p95_over_budget_on_the_fleet_is_a_breach() -> None:
    agg = engine()
    agg.name(named(ReleaseRole.STABLE))
    feed(agg, START, devices=5, latency_ms=(2.0, 3.0, 90.0, 95.0))  # half the answers slow
    tick = agg.tick(START + 1.0)
    health = shown(tick).health
    assert health.breach
    assert health.reasons[0].startswith("p95_latency_ms:")


def test_alerts_are_written_at_most_once_per_gap_with_the_changes_since() -> None:
    agg = engine(audit_gap_s=600.0)
    agg.name(named(ReleaseRole.STABLE))
    feed(agg, START, devices=2, errors=5)
    assert [a.event for a in agg.tick(START + 1.0).alerts] == ["health_breach"]
    feed(agg, START + 100.0, devices=2)  # recovered within the gap: not told yet
    assert agg.tick(START + 101.0).alerts == []
    feed(agg, START + 200.0, devices=2, errors=5)  # and breached again
    assert agg.tick(START + 201.0).alerts == []
    [alert] = agg.tick(START + 601.0).alerts
    assert (alert.event, alert.changes) == ("health_breach", 2)


def test_a_restarted_engine_takes_back_references_and_alarms_from_its_snapshot() -> None:
    first = engine()
    _rolled_out(first)
    feed(first, START + 70.0, devices=3, labels=SHIFTED)
    before = first.tick(START + 75.0)
    assert [a.event for a in before.alerts] == ["drift"]
    retained = decode(encode(before.classes[CLASS]), ClassTelemetry)

    second = engine()
    second.name(named(ReleaseRole.STABLE))
    assert second.restore(retained, now=START + 80.0) == 1
    feed(second, START + 90.0, devices=3, labels=SHIFTED)
    after = second.tick(START + 95.0)
    restored = shown(after).drift
    assert restored.reference is ReferenceSource.ROLLOUT
    assert restored.reference_confidence == shown(before).drift.reference_confidence
    assert restored.reference_labels == shown(before).drift.reference_labels
    assert restored.alert
    assert restored.since == shown(before).drift.since
    assert after.alerts == []  # in the audit log already
    assert second.restore(retained, now=START + 96.0) == 0  # a reference is never replaced


def test_a_snapshot_of_hostile_maxima_stays_within_the_codec_bound() -> None:
    """Every release a class may follow, each flooded with long distinct labels: the
    snapshot shows a bounded number of them (counts kept under ``…other``) and encodes
    well under the codec's limit."""
    agg = engine(releases_kept=MAX_RELEASES)
    releases = [f"{'m' * 60}-{n}:{'v' * 60}@{n:012d}" for n in range(MAX_RELEASES)]
    agg.name({CLASS: {r: Named(ReleaseRole.STABLE, BUDGET) for r in releases}})
    for n, release in enumerate(releases):
        labels = {f"{n}-{i}".ljust(MAX_LABEL_CHARS, "x"): 1 + i for i in range(256)}
        summary = window(release=release, end=START, count=sum(labels.values()), labels=labels)
        assert agg.add(CLASS, summary, now=START)
    snapshot = agg.tick(START + 1.0).classes[CLASS]
    assert len(snapshot.releases) == MAX_RELEASES
    for each in snapshot.releases:
        assert len(each.hour.labels) == MAX_LABELS_SHOWN + 1
        assert sum(each.hour.labels.values()) == each.hour.inferences
        assert OTHER_LABEL in each.hour.labels
    payload = encode(snapshot)
    assert len(payload) < MAX_MESSAGE_BYTES
    assert decode(payload, ClassTelemetry) == snapshot
