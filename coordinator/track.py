"""One release of one class as the fleet telemetry engine follows it, pure: its pending
summaries, its rolling windows, its reference, its drift and health alarms
(:mod:`coordinator.aggregate` holds the theory of operation)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from coordinator.alerts import Alarm, Alert, AlertKind, HealthMeasure, judge_health
from coordinator.drift import DriftMeasure, DriftPolicy, judge_drift
from coordinator.windows import Ring, Tally
from schemas import (
    HealthBudget,
    ReferenceSource,
    ReleaseRole,
    ReleaseTelemetry,
    TelemetrySummary,
)
from schemas.classtelemetry import MAX_LABELS_SHOWN

__all__ = ["HOUR", "MINUTE", "Named", "Track", "restore"]

MINUTE: Final = (10.0, 6)
"""The last minute: six buckets of 10 s."""
HOUR: Final = (60.0, 60)
"""The last hour: sixty buckets of 1 min."""


@dataclass(frozen=True, slots=True)
class Named:
    """A release the coordinator publishes for a class."""

    role: ReleaseRole
    budget: HealthBudget
    rollout_id: str | None = None


class Track:
    """One release of one class: its windows, its reference and its alarms."""

    def __init__(self, release: str, now: float) -> None:
        self.release = release
        self.minute = Ring(*MINUTE)
        self.hour = Ring(*HOUR)
        self.pending: dict[int, Tally] = {}
        """What arrived since the last tick, by the minute's bucket (its epoch)."""
        self.late = Tally()
        """What arrived since the last tick from before the hour: for the reference."""
        self.reference = Tally()
        self.reference_from: ReferenceSource | None = None
        self.first_seen = self.last_seen = now
        self.named: Named | None = None
        self.budget: HealthBudget | None = None
        self.rollout_id: str | None = None
        self.was_candidate = False
        self.rollout_ended = False
        self.drift = Alarm()
        self.health = Alarm()
        self.drift_measure: DriftMeasure | None = None
        self.health_measure: HealthMeasure | None = None

    @property
    def role(self) -> ReleaseRole:
        return ReleaseRole.PAST if self.named is None else self.named.role

    def rename(self, named: Named | None) -> None:
        if self.named is not None and self.named.role is ReleaseRole.CANDIDATE:
            self.rollout_ended = named is None or named.role is not ReleaseRole.CANDIDATE
        self.named = named
        if named is None:
            return
        self.budget = named.budget
        self.rollout_id = named.rollout_id or self.rollout_id
        self.was_candidate = self.was_candidate or named.role is ReleaseRole.CANDIDATE

    def add(self, summary: TelemetrySummary, t: float, now: float, labels_kept: int) -> bool:
        """Count ``summary`` at ``t`` (at most ``now``) with what else arrived for its
        10 s since the last tick; False when it is from before the hour."""
        self.last_seen = max(self.last_seen, now)
        if now - t >= self.hour.seconds:
            if self.reference_from is None:
                self.late.count_summary(summary, labels_kept)
            return False
        epoch = math.floor(t / self.minute.bucket_s)
        pending = self.pending.get(epoch)
        if pending is None:
            pending = self.pending[epoch] = Tally()
        pending.count_summary(summary, labels_kept)
        return True

    def fold(self, now: float, labels_kept: int) -> None:
        """What arrived since the last tick, into the reference (while it gathers) and
        the windows, its labels mapped once to the hour's vocabulary."""
        if self.reference_from is None and self.late.count:
            self.reference.add(self.late.relabelled(self.reference, labels_kept))
        self.late.clear()
        for epoch, tally in self.pending.items():
            if self.reference_from is None:
                self.reference.add(tally.relabelled(self.reference, labels_kept))
            mapped = tally.relabelled(self.hour.total, labels_kept)
            t = epoch * self.minute.bucket_s
            if self.hour.add(t, mapped, now):
                self.minute.add(t, mapped, now)
        self.pending.clear()

    def fix_reference(self, policy: DriftPolicy, now: float, reference_s: float) -> None:
        if self.reference_from is not None:
            return
        if self.rollout_ended and self.reference.count >= policy.reference_inferences:
            self.reference_from = ReferenceSource.ROLLOUT
        elif now - self.first_seen >= reference_s:
            self.reference_from = (
                ReferenceSource.ROLLOUT if self.was_candidate else ReferenceSource.FIRST_HOUR
            )

    def judge(self, hw_class: str, policy: DriftPolicy, now: float, clear_ratio: float) -> None:
        windows = (self.minute, self.hour)
        self.drift_measure = None
        if self.reference_from is not None and self.reference.count >= policy.reference_inferences:
            self.drift_measure = judge_drift(
                policy,
                self.reference,
                windows,
                clear_ratio=clear_ratio,
                labels_compared=MAX_LABELS_SHOWN,
            )
        if self.drift_measure is not None:
            m = self.drift_measure
            self.drift.judge(
                over=m.over, clear=m.clear, now=now, detail=self._drift_detail(hw_class, policy)
            )
        self.health_measure = None
        if self.budget is not None:
            self.health_measure = judge_health(self.budget, windows, clear_ratio=clear_ratio)
        if self.health_measure is not None:
            h = self.health_measure
            self.health.judge(
                over=h.over, clear=h.clear, now=now, detail=self._health_detail(hw_class)
            )

    def _drift_detail(self, hw_class: str, policy: DriftPolicy) -> str:
        m = self.drift_measure
        assert m is not None  # judged just before
        scores = [
            f"{name} {value:.3f}"
            for name, value in (
                ("confidence PSI", m.confidence_psi),
                ("labels PSI", m.labels_psi),
                ("confidence KS", m.confidence_ks),
            )
            if value is not None
        ]
        source = "?" if self.reference_from is None else self.reference_from.value
        return (
            f"{self.release} on {hw_class}: {', '.join(scores)} over the last {m.window_s:g} s "
            f"(PSI threshold {policy.psi:g}; reference: {source}, "
            f"{self.reference.count} inferences)"
        )

    def _health_detail(self, hw_class: str) -> str:
        h = self.health_measure
        assert h is not None  # judged just before
        p95 = "-" if h.p95_ms is None else f"{h.p95_ms:.2f}"
        said = ", ".join(h.reasons) if h.over else "within budget"
        return (
            f"{self.release} on {hw_class}: {said} over the last {h.window_s:g} s ({h.inferences} "
            f"inferences, error rate {h.error_rate:.3f}, p95 <= {p95} ms)"
        )

    def alerts(self, hw_class: str, now: float, gap_s: float) -> list[Alert]:
        found = []
        for kind, alarm in ((AlertKind.DRIFT, self.drift), (AlertKind.HEALTH, self.health)):
            changes = alarm.due(now, gap_s)
            if changes:
                found.append(
                    Alert(
                        kind=kind,
                        hw_class=hw_class,
                        release=self.release,
                        rollout_id=self.rollout_id,
                        raised=alarm.raised,
                        detail=alarm.detail,
                        changes=changes,
                    )
                )
        return found


def restore(track: Track, shown: ReleaseTelemetry, now: float) -> None:
    """Take back what a retained snapshot shows of ``track``'s release: its fixed
    reference and its raised alarms (as told: they are in the audit log already)."""
    drift, health = shown.drift, shown.health
    track.first_seen = min(track.first_seen, shown.first_seen)
    track.rollout_id = track.rollout_id or shown.rollout_id
    if drift.reference is not None:
        reference = track.reference = Tally(drift.reference_inferences)
        reference.confidence = list(drift.reference_confidence)
        reference.labels = dict(drift.reference_labels)
        track.reference_from = drift.reference
    for alarm, raised, since in (
        (track.drift, drift.alert, drift.since),
        (track.health, health.breach, health.since),
    ):
        if raised and not alarm.raised:
            alarm.raised, alarm.since, alarm.told_at = True, since, now
