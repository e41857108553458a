"""The reference for the fleet view's counts: every device of a class read again, given
who the view holds as targeted and silent (those depend on when devices came and went,
which a recount cannot see). The property tests hold the kept counts to it;
``bench/fleetview.py`` times it as its baseline."""

from __future__ import annotations

from coordinator.fleet import FleetView, agreed_of, is_verdict
from coordinator.rollout import RolloutRecord
from schemas import Verdict, WaveCounts

__all__ = ["recount"]


def recount(fleet: FleetView, record: RolloutRecord, name: str) -> WaveCounts:
    """The class's current wave counted from every device of ``fleet``."""
    tally = fleet._tallies.get((record.id, name))
    targeted_at = {} if tally is None else tally.targeted
    silent_ids = set() if tally is None else tally.silent
    published = record.lanes[name].published_at is not None
    candidate = record.candidates[name]
    members = targeted = updated = healthy = unhealthy = silent = pending = 0
    shadowed = agreed = 0
    for view in fleet.devices.values():
        if view.hw_class != name or not fleet.in_cohort(record, view):
            continue
        members += 1
        if view.state is not None and view.state.active_sha256 == candidate.artifact.sha256:
            updated += 1
        report = view.health
        if (
            report is not None
            and report.rollout_id == record.id
            and report.release == candidate.release_id
            and is_verdict(report)
        ):
            targeted += 1
            healthy += report.verdict is Verdict.HEALTHY
            unhealthy += report.verdict is not Verdict.HEALTHY
            shadowed += agreed_of(report)[0]
            agreed += agreed_of(report)[1]
        elif view.device_id in targeted_at:
            targeted += 1
            silent += view.device_id in silent_ids
        else:
            # A member online since the wave's manifest went out is targeted, always.
            assert not (published and view.online), view.device_id
            pending += published
    return WaveCounts(
        members=members,
        targeted=targeted,
        updated=updated,
        healthy=healthy,
        unhealthy=unhealthy,
        silent=silent,
        pending=pending,
        shadow_inferences=shadowed,
        agreed=agreed,
    )
