"""The reference for the fleet view's counts: every device read again, the way
``FleetView.counts`` counted before it kept its counts as devices report. The property
tests hold the kept counts to it; ``bench/fleetview.py`` times it as its baseline."""

from __future__ import annotations

from coordinator.fleet import FleetView, is_verdict
from coordinator.rollout import RolloutRecord
from schemas import Verdict, WaveCounts

__all__ = ["recount"]


def recount(fleet: FleetView, record: RolloutRecord) -> WaveCounts:
    """The rollout's current wave counted from every device of ``fleet``."""
    members = targeted = updated = healthy = unhealthy = 0
    for view in fleet.devices.values():
        if not fleet.in_cohort(record, view):
            continue
        members += 1
        candidate = record.candidates[view.hw_class or ""]
        report = view.health
        reported = (
            report is not None
            and report.rollout_id == record.id
            and report.release == candidate.release_id
            and is_verdict(report)
        )
        if not (view.online or reported):
            continue
        targeted += 1
        if view.state is not None and view.state.active_sha256 == candidate.artifact.sha256:
            updated += 1
        if reported and report is not None:
            if report.verdict is Verdict.HEALTHY:
                healthy += 1
            else:
                unhealthy += 1
    return WaveCounts(
        members=members,
        targeted=targeted,
        updated=updated,
        healthy=healthy,
        unhealthy=unhealthy,
    )
