"""The coordinator's view of a wave: who is targeted, who reported what. Reports arrive at
least once and out of order; counting must be idempotent and keep the newest."""

from __future__ import annotations

from coordinator.fleet import FleetView
from coordinator.rollout import RolloutRecord
from coordinator.waves import percent_cutoff
from schemas import (
    HealthReport,
    Manifest,
    RolloutCohort,
    Verdict,
    WaveCounts,
    bucket,
)
from tests.coordinator.records import CLASS, T0, device_state, with_lane


def _report(
    record: RolloutRecord,
    device_id: str,
    verdict: Verdict,
    *,
    report_id: str | None = None,
    at: float = T0,
    rollout_id: str | None = None,
    release: str | None = None,
) -> HealthReport:
    return HealthReport(
        report_id=report_id or f"{device_id}-{verdict.value}-{at}",
        device_id=device_id,
        rollout_id=record.id if rollout_id is None else rollout_id,
        manifest_seq=4,
        release=record.release_id if release is None else release,
        verdict=verdict,
        inferences=100,
        errors=0,
        p95_latency_ms=1.0,
        soak_seconds=4.0,
        at=at,
    )


def _manifest(record: RolloutRecord) -> Manifest:
    """The manifest the coordinator publishes for this wave (salt = rollout id)."""
    return Manifest(
        hw_class=CLASS,
        seq=4,
        issued_at=T0,
        expires_at=T0 + 86_400.0,
        stable=None,
        rollout=RolloutCohort(
            id=record.id,
            candidate=record.candidates[CLASS],
            salt=record.id,
            cutoff_bp=record.lanes[CLASS].cutoff_bp,
            canaries=record.canaries,
        ),
    )


def _at(record: RolloutRecord, wave: int) -> RolloutRecord:
    """``record`` with its class in ``wave``, the wave's manifest out."""
    cutoff = percent_cutoff(record.waves[wave].percent or 0.0)
    return with_lane(record, wave=wave, target_bp=cutoff, cutoff_bp=cutoff)


def _online(fleet: FleetView, device_id: str, **state: str) -> None:
    fleet.on_presence(device_id, online=True)
    fleet.on_state(device_state(device_id, **state))


def _split_by_cohort(record: RolloutRecord, n: int) -> tuple[list[str], list[str]]:
    """Device ids the manifest sends to the candidate, and those it keeps on stable."""
    manifest = _manifest(record)
    ids = [f"cam-{i:04d}" for i in range(n)]
    inside = [d for d in ids if manifest.target_for(d).rollout_id == record.id]
    return inside, [d for d in ids if d not in inside]


def test_cohort_is_exactly_the_devices_the_manifest_sends_to_the_candidate(
    record: RolloutRecord,
) -> None:
    for wave in range(3):
        at_wave = _at(record, wave)
        inside, outside = _split_by_cohort(at_wave, 200)
        assert (inside and outside) or wave == 2
        fleet = FleetView()
        for device_id in [*inside, *outside, *at_wave.canaries]:
            _online(fleet, device_id)
        assert fleet.counts(at_wave, CLASS).targeted == len(inside) + len(at_wave.canaries)
        for device_id in [*inside, *at_wave.canaries]:
            assert fleet.in_cohort(at_wave, fleet.device(device_id))
        for device_id in outside:
            assert not fleet.in_cohort(at_wave, fleet.device(device_id))


def test_canary_is_targeted_whatever_its_bucket(record: RolloutRecord) -> None:
    _, outside = _split_by_cohort(record, 50)
    canary_record = record.model_copy(update={"canaries": (outside[0],)})
    fleet = FleetView()
    _online(fleet, outside[0])
    _online(fleet, outside[1])
    assert fleet.counts(canary_record, CLASS).targeted == 1
    assert fleet.counts(record, CLASS).targeted == 0


def test_devices_of_other_classes_or_of_unknown_class_are_not_targeted(
    record: RolloutRecord,
) -> None:
    fleet = FleetView()
    _online(fleet, "cam-canary", hw_class="medical-cart-cpu")
    fleet.on_presence("cam-canary-2", online=True)  # its state has not arrived yet
    fleet.on_health(_report(record, "cam-canary-2", Verdict.HEALTHY))
    canaries = record.model_copy(update={"canaries": ("cam-canary", "cam-canary-2")})
    assert fleet.counts(canaries, CLASS) == WaveCounts()


def test_offline_device_is_not_waited_for_unless_it_already_reported(
    record: RolloutRecord,
) -> None:
    inside, _ = _split_by_cohort(record, 200)
    quiet, reported = inside[:2]
    fleet = FleetView()
    for device_id in (quiet, reported):
        fleet.on_state(device_state(device_id))
        fleet.on_presence(device_id, online=False)
    assert fleet.counts(record, CLASS) == WaveCounts(members=2, targeted=0, pending=2)

    fleet.on_health(_report(record, reported, Verdict.HEALTHY))
    assert fleet.counts(record, CLASS) == WaveCounts(members=2, targeted=1, healthy=1, pending=1)


def test_forgotten_device_is_no_member_of_any_wave(record: RolloutRecord) -> None:
    inside, _ = _split_by_cohort(record, 200)
    kept, revoked = inside[:2]
    fleet = FleetView()
    for device_id in (kept, revoked):
        _online(fleet, device_id)
    fleet.on_health(_report(record, revoked, Verdict.UNHEALTHY))
    fleet.forget(revoked)
    assert fleet.counts(record, CLASS) == WaveCounts(members=1, targeted=1)


def test_counts_updated_healthy_and_unhealthy_devices(record: RolloutRecord) -> None:
    inside, _ = _split_by_cohort(record, 400)
    sha = record.candidates[CLASS].artifact.sha256
    fleet = FleetView()
    for device_id in inside[:4]:
        _online(fleet, device_id, sha256=sha)
    _online(fleet, inside[4])  # still on stable
    fleet.on_health(_report(record, inside[0], Verdict.HEALTHY))
    fleet.on_health(_report(record, inside[1], Verdict.HEALTHY))
    fleet.on_health(_report(record, inside[2], Verdict.UNHEALTHY))
    assert fleet.counts(record, CLASS) == WaveCounts(
        members=5, targeted=5, updated=4, healthy=2, unhealthy=1
    )


def test_redelivered_health_report_is_ignored(record: RolloutRecord) -> None:
    """QoS 1 redelivers: an old unhealthy report arriving again, with the same timestamp as
    the healthy one that superseded it, must not count again."""
    fleet = FleetView()
    device_id = _split_by_cohort(record, 200)[0][0]
    _online(fleet, device_id)
    first = _report(record, device_id, Verdict.UNHEALTHY, report_id="r-1", at=T0)
    second = _report(record, device_id, Verdict.HEALTHY, report_id="r-2", at=T0)
    assert fleet.on_health(first)
    assert fleet.on_health(second)
    assert not fleet.on_health(first)
    assert fleet.counts(record, CLASS) == WaveCounts(members=1, targeted=1, healthy=1)


def test_older_health_report_does_not_replace_a_newer_one(record: RolloutRecord) -> None:
    fleet = FleetView()
    device_id = _split_by_cohort(record, 200)[0][0]
    _online(fleet, device_id)
    assert fleet.on_health(_report(record, device_id, Verdict.HEALTHY, at=T0 + 10.0))
    assert not fleet.on_health(_report(record, device_id, Verdict.UNHEALTHY, at=T0 + 5.0))
    assert fleet.counts(record, CLASS) == WaveCounts(members=1, targeted=1, healthy=1)
    assert fleet.on_health(_report(record, device_id, Verdict.UNHEALTHY, at=T0 + 20.0))
    assert fleet.counts(record, CLASS) == WaveCounts(members=1, targeted=1, unhealthy=1)


def test_reports_about_another_rollout_or_release_are_not_counted(
    record: RolloutRecord,
) -> None:
    inside, _ = _split_by_cohort(record, 400)
    online, offline = inside[:2], inside[2:4]
    fleet = FleetView()
    for device_id in online:
        _online(fleet, device_id)
    for device_id in offline:
        fleet.on_state(device_state(device_id))
    for devices in (online, offline):
        fleet.on_health(_report(record, devices[0], Verdict.UNHEALTHY, rollout_id="rollout-6"))
        fleet.on_health(_report(record, devices[1], Verdict.UNHEALTHY, release="digits-v1@00"))
    assert fleet.counts(record, CLASS) == WaveCounts(members=4, targeted=2, pending=2)


def test_unhealthy_reasons_name_the_devices_and_their_reasons(record: RolloutRecord) -> None:
    inside, _ = _split_by_cohort(record, 200)
    fleet = FleetView()
    for device_id in inside[:2]:
        _online(fleet, device_id)
    fleet.on_health(_report(record, inside[0], Verdict.HEALTHY))
    slow = _report(record, inside[1], Verdict.UNHEALTHY).model_copy(
        update={"reasons": ("p95_latency_ms:35.00>10.00",)}
    )
    fleet.on_health(slow)
    assert fleet.unhealthy_reasons(record, CLASS) == [f"{inside[1]}: p95_latency_ms:35.00>10.00"]


def test_corrupt_chunk_or_fetch_timeout_is_not_a_verdict_on_the_candidate(
    record: RolloutRecord,
) -> None:
    inside, _ = _split_by_cohort(_at(record, 2), 3)
    at_last = _at(record, 2)
    fleet = FleetView()
    for device_id in inside:
        _online(fleet, device_id)
    transfer, model = inside[0], inside[1]
    fleet.on_health(
        _report(at_last, transfer, Verdict.UNHEALTHY).model_copy(
            update={"reasons": ("chunk_corrupt: chunk 3 of abc fails its sha256", "fetch_timeout")}
        )
    )
    fleet.on_health(
        _report(at_last, model, Verdict.UNHEALTHY).model_copy(
            update={"reasons": ("chunk_corrupt", "p95_latency_ms:35.10>10.00")}
        )
    )
    counts = fleet.counts(at_last, CLASS)
    assert (counts.unhealthy, counts.healthy) == (1, 0)
    reasons = fleet.unhealthy_reasons(at_last, CLASS)
    assert [r.split(":")[0] for r in reasons] == [model]


def test_unhealthy_reasons_quote_each_device_bounded(record: RolloutRecord) -> None:
    at_last = _at(record, 2)
    inside, _ = _split_by_cohort(at_last, 3)
    fleet = FleetView()
    _online(fleet, inside[0])
    fleet.on_health(
        _report(at_last, inside[0], Verdict.UNHEALTHY).model_copy(
            update={"reasons": tuple("e" * 200 for _ in range(16))}
        )
    )
    (reason,) = fleet.unhealthy_reasons(at_last, CLASS)
    assert reason.startswith(inside[0])
    assert len(reason) <= 300
    assert reason.endswith("…")


# -- silence ----------------------------------------------------------------------------

SILENCE = 120.0  # the records' policy


def _published(record: RolloutRecord, at: float) -> RolloutRecord:
    return with_lane(record, published_at=at)


def test_a_targeted_device_that_goes_offline_is_silent_once_its_limit_passes(
    record: RolloutRecord,
) -> None:
    inside, _ = _split_by_cohort(record, 200)
    gone, quiet, fine = inside[:3]
    fleet = FleetView(now=T0)
    for device_id in (gone, quiet, fine):
        _online(fleet, device_id)
    assert fleet.counts(record, CLASS).targeted == 3
    fleet.on_presence(gone, online=False)  # offline: still targeted, not pending
    fleet.on_health(_report(record, fine, Verdict.HEALTHY))
    fleet.tick(T0 + SILENCE - 1.0)
    assert fleet.counts(record, CLASS) == WaveCounts(members=3, targeted=3, healthy=1)
    fleet.tick(T0 + SILENCE)
    # Offline, or online with no verdict: both silent; the one that reported is not.
    assert fleet.counts(record, CLASS) == WaveCounts(members=3, targeted=3, healthy=1, silent=2)
    assert fleet.silent(record, CLASS, 10) == sorted((gone, quiet))
    assert fleet.silent(record, CLASS, 1) == sorted((gone, quiet))[:1]
    # A verdict that comes late counts as a verdict.
    fleet.on_health(_report(record, quiet, Verdict.HEALTHY, at=T0 + 200.0))
    assert fleet.counts(record, CLASS) == WaveCounts(members=3, targeted=3, healthy=2, silent=1)
    assert fleet.silent(record, CLASS, 10) == [gone]


def test_a_device_online_when_the_manifest_went_out_is_targeted_though_gone_before_a_look(
    record: RolloutRecord,
) -> None:
    """It may die of the candidate between the manifest and the next tick."""
    inside, _ = _split_by_cohort(record, 200)
    fleet = FleetView(now=T0)
    _online(fleet, inside[0])
    fleet.on_presence(inside[0], online=False)  # at T0: the manifest's own moment
    counts = fleet.counts(_published(record, T0), CLASS)
    assert (counts.targeted, counts.pending) == (1, 0)
    fleet.tick(T0 + SILENCE)
    assert fleet.counts(_published(record, T0), CLASS).silent == 1


def test_a_device_offline_before_the_manifest_is_pending_and_never_silent(
    record: RolloutRecord,
) -> None:
    inside, _ = _split_by_cohort(record, 200)
    fleet = FleetView(now=T0 - 10.0)
    _online(fleet, inside[0])
    fleet.on_presence(inside[0], online=False)
    fleet.tick(T0 + 10 * SILENCE)
    assert fleet.counts(record, CLASS) == WaveCounts(members=1, pending=1)
    # Back online later: targeted from then, silent only a limit after that.
    fleet.on_presence(inside[0], online=True)
    assert fleet.counts(record, CLASS) == WaveCounts(members=1, targeted=1)
    fleet.tick(T0 + 11 * SILENCE)
    assert fleet.counts(record, CLASS).silent == 1


def test_nobody_is_targeted_before_the_waves_manifest_is_out(record: RolloutRecord) -> None:
    inside, _ = _split_by_cohort(record, 200)
    fleet = FleetView(now=T0)
    _online(fleet, inside[0])
    unpublished = with_lane(record, published_at=None)
    assert fleet.counts(unpublished, CLASS) == WaveCounts(members=1)
    fleet.tick(T0 + 10 * SILENCE)
    assert fleet.counts(unpublished, CLASS).silent == 0


def test_a_raised_cutoff_adds_the_devices_it_newly_covers(record: RolloutRecord) -> None:
    ids = [f"cam-{i:04d}" for i in range(300)]
    fleet = FleetView(now=T0)
    for device_id in ids:
        _online(fleet, device_id)
    narrow = with_lane(record, cutoff_bp=2000, target_bp=5000)
    before = fleet.counts(narrow, CLASS)
    wide = with_lane(record, cutoff_bp=5000, target_bp=5000)
    after = fleet.counts(wide, CLASS)  # the same wave: kept, not recounted
    expected = sum(bucket(record.id, d) < 5000 for d in ids)
    assert before.members < after.members == expected
    assert after.targeted == expected
    ranked = fleet.lane(wide, CLASS).ranked
    assert list(ranked) == sorted(bucket(record.id, d) for d in ids)


def test_an_offline_device_whose_state_says_it_took_the_candidate_is_targeted(
    record: RolloutRecord,
) -> None:
    """A coordinator restarted while the device died never saw it online: its retained
    state still says it went for the candidate, so it is silent, not pending."""
    inside, _ = _split_by_cohort(record, 200)
    fleet = FleetView(now=T0 + 500.0)
    state = device_state(inside[0]).model_copy(
        update={"rollout_id": record.id, "target_release": record.release_id}
    )
    fleet.on_state(state)
    fleet.on_presence(inside[0], online=False)
    assert fleet.counts(record, CLASS).targeted == 1
    fleet.tick(T0 + 500.0)  # targeted from the wave's start: its limit passed long ago
    assert fleet.counts(record, CLASS).silent == 1
