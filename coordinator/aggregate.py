"""Fleet telemetry aggregated per hardware class and release, pure: summaries in, ``now``
passed in, snapshots and alerts out.

Theory of operation.

- **What is followed.** Each tick the service names, per class, the releases the
  coordinator publishes (its stable and the candidates of its live rollouts) with their
  health budgets (:meth:`Aggregator.name`). A summary the ledger counted (so never a
  duplicate) from a device of a known class adds to its release's track, which the first
  summary of a named release opens. A release no longer named stays, as ``past``, while
  its devices are heard from, and goes an hour after the last. A class keeps at most
  ``releases_kept`` tracks; a newly named release takes the place of the past one heard
  from least recently. What no track takes (releases nobody named: a hostile or stray
  device) is counted per class as ``unattributed``, and costs nothing more.
- **Time.** A summary counts at its window's end, never later than ``now`` (device clocks
  are not trusted ahead); one older than the hour counts only toward the reference.
  Windows are :class:`coordinator.windows.Ring` s: the last minute in 10 s buckets, the
  last hour in 1 min buckets. A summary costs O(its size), a tick O(buckets + labels)
  per track: never O(devices).
- **Reference.** A track gathers every summary into its reference until it is fixed: once
  the release's rollout ended (it stopped being a live candidate) and the reference holds
  the class's ``drift.reference_inferences``, or an hour after its first summary
  (``first_hour`` for a release this coordinator did not roll out). Then each tick
  compares the recent window with it (:mod:`coordinator.drift`).
- **Health after the soak.** Each tick also holds every release to its budget, as long as
  it runs (:func:`coordinator.alerts.judge_health`).
- **Alerts.** Both go through an :class:`coordinator.alerts.Alarm` (hysteresis, and at most
  one audit entry per alarm per ``audit_gap_s``); :meth:`Aggregator.tick` returns the
  entries due with the snapshots.
- **Restart.** A restarted coordinator takes back references and raised alarms from its
  retained snapshots (:meth:`Aggregator.restore`); the windows start empty.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from coordinator.alerts import Alert
from coordinator.drift import DriftPolicy
from coordinator.track import HOUR, Named, Track, restore
from coordinator.windows import Ring, Tally, bucket_ms
from schemas import (
    ClassTelemetry,
    DriftStatus,
    HealthStatus,
    ReleaseRole,
    ReleaseTelemetry,
    TelemetrySummary,
    WindowStats,
)
from schemas.classtelemetry import MAX_LABELS_SHOWN, MAX_RELEASE_CHARS, MAX_RELEASES
from schemas.telemetry import MAX_LABELS, OTHER_LABEL

__all__ = ["AggregateSettings", "AggregateStats", "Aggregator", "Named", "Tick"]

_ORDER: Final = {ReleaseRole.STABLE: 0, ReleaseRole.CANDIDATE: 1, ReleaseRole.PAST: 2}


@dataclass(frozen=True, kw_only=True)
class AggregateSettings:
    publish_s: float = 10.0
    """How often the snapshots are taken, and published where they changed."""
    releases_kept: int = 8
    """Releases followed per class."""
    labels_kept: int = MAX_LABELS
    """Distinct labels a window (and a reference) counts; the rest go to ``…other``."""
    reference_s: float = 3600.0
    """A release's reference is fixed at the latest this long after its first summary."""
    clear_ratio: float = 0.8
    """An alarm clears once its measure is below this share of its limit."""
    audit_gap_s: float = 60.0
    """At most one audit entry per alarm this often."""

    def __post_init__(self) -> None:
        if not 1 <= self.releases_kept <= MAX_RELEASES:
            msg = f"releases_kept must be within 1..{MAX_RELEASES}"
            raise ValueError(msg)
        if self.labels_kept < 2 or not 0.0 < self.clear_ratio <= 1.0:
            msg = "labels_kept must be at least 2, clear_ratio within (0, 1]"
            raise ValueError(msg)
        if min(self.publish_s, self.reference_s) <= 0 or self.audit_gap_s < 0:
            msg = "publish_s and reference_s must be positive, audit_gap_s not negative"
            raise ValueError(msg)


@dataclass
class AggregateStats:
    added: int = 0
    """Summaries added to a release's windows (or only its reference, when late)."""
    late: int = 0
    """Of them, those older than the hour."""
    unattributed: int = 0
    """Summaries of a release no track follows."""
    unclassed: int = 0
    """Summaries of a device whose class is unknown, or not in the profiles."""
    no_release: int = 0
    """Summaries of a device running no model."""


@dataclass(frozen=True, slots=True)
class Tick:
    classes: dict[str, ClassTelemetry]
    """Each class that has had something to show."""
    alerts: list[Alert] = field(default_factory=list)


class Aggregator:
    def __init__(
        self,
        policies: Mapping[str, DriftPolicy],
        settings: AggregateSettings | None = None,
        *,
        now: float,
    ) -> None:
        """``policies``: the drift policy of every class followed (the profiles')."""
        self.settings = settings or AggregateSettings()
        self.stats = AggregateStats()
        self._policies = dict(policies)
        self._started = now
        self._tracks: dict[str, dict[str, Track]] = {c: {} for c in self._policies}
        self._named: dict[str, dict[str, Named]] = {c: {} for c in self._policies}
        self._unattributed = {c: Ring(*HOUR) for c in self._policies}
        self._shown: set[str] = set()
        """Classes that had something to show: their snapshot goes on, empty or not."""

    def releases(self, hw_class: str) -> list[str]:
        """The releases of ``hw_class`` followed now."""
        return list(self._tracks.get(hw_class, {}))

    def knows(self, hw_class: str, release: str) -> bool:
        """Whether a summary of ``release`` would be followed (named, or followed
        already)."""
        return release in self._tracks.get(hw_class, {}) or release in self._named.get(hw_class, {})

    def name(self, named: Mapping[str, Mapping[str, Named]]) -> None:
        """The releases the coordinator publishes now, per class (others are ``past``)."""
        for hw_class, tracks in self._tracks.items():
            releases = self._named[hw_class] = dict(named.get(hw_class, {}))
            for release, track in tracks.items():
                track.rename(releases.get(release))

    def add(self, hw_class: str | None, summary: TelemetrySummary, now: float) -> bool:
        """Count a summary the ledger counted, of a device of ``hw_class``; whether a
        track took it."""
        stats = self.stats
        if hw_class not in self._tracks:
            stats.unclassed += 1
            return False
        assert hw_class is not None  # every key is a class
        if summary.release is None:
            stats.no_release += 1
            return False
        t = min(now, summary.window_end) if math.isfinite(summary.window_end) else now
        track = self._tracks[hw_class].get(summary.release) or self._open(
            hw_class, summary.release, now
        )
        if track is None:
            stats.unattributed += 1
            self._unattributed[hw_class].add(t, Tally(summary.count), now)
            return False
        stats.added += 1
        if not track.add(summary, t, now, self.settings.labels_kept):
            stats.late += 1
        return True

    def _open(self, hw_class: str, release: str, now: float) -> Track | None:
        """A track for a named release, in place of the past one heard from least
        recently if the class has no room; None for a release nobody named."""
        named = self._named[hw_class].get(release)
        if named is None or len(release) > MAX_RELEASE_CHARS:
            return None
        tracks = self._tracks[hw_class]
        if len(tracks) >= self.settings.releases_kept:
            past = [t for t in tracks.values() if t.named is None]
            if not past:
                return None
            del tracks[min(past, key=lambda t: t.last_seen).release]
        track = tracks[release] = Track(release, now)
        track.rename(named)
        return track

    def tick(self, now: float) -> Tick:
        """Advance every window to ``now``, fix references, judge drift and health; the
        snapshot of every class with something to show, and the audit entries due."""
        settings = self.settings
        classes: dict[str, ClassTelemetry] = {}
        alerts: list[Alert] = []
        for hw_class, tracks in self._tracks.items():
            policy = self._policies[hw_class]
            self._unattributed[hw_class].advance(now)
            for release, track in list(tracks.items()):
                track.fold(now, settings.labels_kept)
                track.minute.advance(now)
                track.hour.advance(now)
                if track.named is None and now - track.last_seen >= track.hour.seconds:
                    del tracks[release]  # past, and silent for an hour
                    continue
                track.fix_reference(policy, now, settings.reference_s)
                track.judge(hw_class, policy, now, settings.clear_ratio)
                alerts += track.alerts(hw_class, now, settings.audit_gap_s)
            unattributed = self._unattributed[hw_class].total.count
            if tracks or unattributed or hw_class in self._shown:
                self._shown.add(hw_class)
                classes[hw_class] = ClassTelemetry(
                    hw_class=hw_class,
                    at=now,
                    releases=tuple(
                        self._release(t, policy, now)
                        for t in sorted(
                            tracks.values(), key=lambda t: (_ORDER[t.role], t.first_seen)
                        )
                    ),
                    unattributed=unattributed,
                )
        return Tick(classes, alerts)

    def restore(self, snapshot: ClassTelemetry, now: float) -> int:
        """Take back the fixed references and raised alarms of a retained snapshot (this
        coordinator's, from before a restart) for the releases named now that have no
        reference yet; how many were taken. The alarms count as told."""
        tracks = self._tracks.get(snapshot.hw_class)
        if tracks is None:
            return 0
        taken = 0
        for shown in snapshot.releases:
            track = tracks.get(shown.release) or self._open(snapshot.hw_class, shown.release, now)
            if track is None or track.reference_from is not None:
                continue
            restore(track, shown, now)
            taken += 1
        return taken

    def _release(self, track: Track, policy: DriftPolicy, now: float) -> ReleaseTelemetry:
        return ReleaseTelemetry(
            release=track.release,
            role=track.role,
            rollout_id=track.rollout_id,
            first_seen=track.first_seen,
            last_seen=track.last_seen,
            minute=self._window(track.minute, now),
            hour=self._window(track.hour, now),
            drift=_drift(track, policy),
            health=_health(track),
        )

    def _window(self, ring: Ring, now: float) -> WindowStats:
        total = ring.total
        observed = min(ring.seconds, max(1.0, now - self._started))
        p50, p95, p99 = (
            None if q is None else bucket_ms(q) for q in total.quantiles(0.5, 0.95, 0.99)
        )
        return WindowStats(
            seconds=ring.seconds,
            observed_s=observed,
            inferences=total.count,
            errors=total.errors,
            rate_per_s=total.count / observed,
            error_rate=total.errors / total.count if total.count else None,
            p50_ms=p50,
            p95_ms=p95,
            p99_ms=p99,
            confidence=tuple(total.confidence),
            labels=_shown(total.labels),
        )


def _shown(labels: Mapping[str, int]) -> dict[str, int]:
    """The ``MAX_LABELS_SHOWN`` most frequent labels, the rest summed under ``…other``."""
    if len(labels) <= MAX_LABELS_SHOWN:
        return dict(labels)
    top = heapq.nlargest(MAX_LABELS_SHOWN + 1, labels.items(), key=lambda kv: kv[1])
    shown = dict(kv for kv in top if kv[0] != OTHER_LABEL)
    shown = dict(list(shown.items())[:MAX_LABELS_SHOWN])
    shown[OTHER_LABEL] = sum(labels.values()) - sum(shown.values())
    return shown


def _drift(track: Track, policy: DriftPolicy) -> DriftStatus:
    m = track.drift_measure
    return DriftStatus(
        reference=track.reference_from,
        reference_inferences=track.reference.count,
        reference_confidence=tuple(track.reference.confidence),
        reference_labels=_shown(track.reference.labels),
        window_s=None if m is None else m.window_s,
        confidence_psi=None if m is None else m.confidence_psi,
        confidence_ks=None if m is None else m.confidence_ks,
        labels_psi=None if m is None else m.labels_psi,
        psi_threshold=policy.psi,
        alert=track.drift.raised,
        since=track.drift.since,
    )


def _health(track: Track) -> HealthStatus:
    h = track.health_measure
    return HealthStatus(
        budget=track.budget,
        window_s=None if h is None else h.window_s,
        breach=track.health.raised,
        reasons=() if h is None else h.reasons,
        since=track.health.since,
    )
