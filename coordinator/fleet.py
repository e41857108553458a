"""What the coordinator knows of the fleet, rebuilt from retained device topics.

Health reports and telemetry summaries arrive at least once (QoS 1), so both are
de-duplicated by their ids: consumers are idempotent.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from coordinator.rollout import RolloutRecord, cutoff_bp
from schemas import DeviceState, HealthReport, TelemetrySummary, Verdict, WaveCounts, bucket
from schemas.errors import Reason, bound_text

__all__ = ["DeviceView", "FleetView", "is_verdict"]

_TRANSIENT: frozenset[str] = frozenset({Reason.CHUNK_CORRUPT.value, Reason.FETCH_TIMEOUT.value})
"""Report reasons about the transfer, not the candidate: a corrupt or missing chunk is
fetched again and says nothing about the model."""


def is_verdict(report: HealthReport) -> bool:
    """False for an unhealthy report whose every reason is a transfer problem."""
    if report.verdict is Verdict.HEALTHY or not report.reasons:
        return True
    return any(r.split(":", 1)[0].strip() not in _TRANSIENT for r in report.reasons)


@dataclass
class DeviceView:
    device_id: str
    online: bool = False
    state: DeviceState | None = None
    health: HealthReport | None = None
    inferences: int = 0
    errors: int = 0

    @property
    def hw_class(self) -> str | None:
        return None if self.state is None else self.state.hw_class


@dataclass
class FleetView:
    seen_kept: int = 100_000
    """Report and summary ids remembered for de-duplication, newest kept."""
    device_reason_chars: int = 300
    """One device's part of a rollback reason: several fit in the status's reason."""
    devices: dict[str, DeviceView] = field(default_factory=dict)
    _seen: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def device(self, device_id: str) -> DeviceView:
        return self.devices.setdefault(device_id, DeviceView(device_id))

    def _first_time(self, message_id: str) -> bool:
        if message_id in self._seen:
            return False
        self._seen[message_id] = None
        if len(self._seen) > self.seen_kept:
            self._seen.popitem(last=False)
        return True

    def forget(self, device_id: str) -> None:
        """Drop a device whose retained state was cleared (``device revoke`` clears every
        channel): it is no longer a member of any wave."""
        self.devices.pop(device_id, None)

    def on_presence(self, device_id: str, online: bool) -> None:
        self.device(device_id).online = online

    def on_state(self, state: DeviceState) -> None:
        self.device(state.device_id).state = state

    def on_health(self, report: HealthReport) -> bool:
        """Record a report; False for a duplicate or one older than the one held."""
        if not self._first_time(report.report_id):
            return False
        view = self.device(report.device_id)
        if view.health is not None and view.health.at > report.at:
            return False
        view.health = report
        return True

    def on_telemetry(self, summary: TelemetrySummary) -> bool:
        if not self._first_time(summary.summary_id):
            return False
        view = self.device(summary.device_id)
        view.inferences += summary.count
        view.errors += summary.errors
        return True

    def in_cohort(self, record: RolloutRecord, view: DeviceView) -> bool:
        if view.hw_class not in record.classes:
            return False
        if view.device_id in record.canaries:
            return True
        return bucket(record.id, view.device_id) < cutoff_bp(record)

    def counts(self, record: RolloutRecord) -> WaveCounts:
        """Counts for the rollout's current wave.

        Targeted devices are the cohort's online ones plus any that already reported
        on this rollout: a device that is offline converges by itself later and is
        not waited for.
        """
        members = targeted = updated = healthy = unhealthy = 0
        for view in self.devices.values():
            if not self.in_cohort(record, view):
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

    def unhealthy_reasons(self, record: RolloutRecord, limit: int = 3) -> list[str]:
        """``device: reason`` for the first unhealthy reports on the rollout's wave."""
        found = []
        for view in sorted(self.devices.values(), key=lambda v: v.device_id):
            report = view.health
            if (
                self.in_cohort(record, view)
                and report is not None
                and report.rollout_id == record.id
                and report.verdict is Verdict.UNHEALTHY
                and is_verdict(report)
            ):
                # Reasons are the device's own words: bounded here, where they are quoted.
                said = ", ".join(report.reasons) or "unhealthy"
                found.append(bound_text(f"{view.device_id}: {said}", self.device_reason_chars))
        return found[:limit]
