"""What the coordinator knows of the fleet, rebuilt from retained device topics.

Health reports arrive at least once (QoS 1), so they are de-duplicated by their ids:
consumers are idempotent. Telemetry is counted by ``coordinator.ledger``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from coordinator.rollout import RolloutRecord, cutoff_bp
from schemas import DeviceState, HealthReport, Verdict, WaveCounts, bucket
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

    @property
    def hw_class(self) -> str | None:
        return None if self.state is None else self.state.hw_class


_Part = tuple[int, int, int, int, int]
"""One device's part of a wave's counts: members, targeted, updated, healthy, unhealthy."""
_NOTHING: _Part = (0, 0, 0, 0, 0)


def _wave_key(record: RolloutRecord) -> tuple[object, ...]:
    """Everything of a record that decides who counts how: a tally is rebuilt when it
    changes (a new wave, a new generation)."""
    releases = sorted((n, r.release_id, r.artifact.sha256) for n, r in record.candidates.items())
    return (record.classes, record.canaries, cutoff_bp(record), tuple(releases))


class _Tally:
    """A wave's counts, summed from every device's part."""

    def __init__(self, key: tuple[object, ...], record: RolloutRecord) -> None:
        self.key = key
        self.record = record
        self._sums = [0, 0, 0, 0, 0]

    def add(self, part: _Part, sign: int) -> None:
        if part is not _NOTHING:
            for i, value in enumerate(part):
                self._sums[i] += sign * value

    def counts(self) -> WaveCounts:
        members, targeted, updated, healthy, unhealthy = self._sums
        return WaveCounts(
            members=members,
            targeted=targeted,
            updated=updated,
            healthy=healthy,
            unhealthy=unhealthy,
        )


@dataclass
class FleetView:
    seen_kept: int = 100_000
    """Report ids remembered for de-duplication, newest kept."""
    device_reason_chars: int = 300
    """One device's part of a rollback reason: several fit in the status's reason."""
    devices: dict[str, DeviceView] = field(default_factory=dict)
    """Changed only through the ``on_*`` methods and :meth:`forget`, which keep the
    counts."""
    _seen: OrderedDict[str, None] = field(default_factory=OrderedDict)
    _tallies: dict[str, _Tally] = field(default_factory=dict)
    """Rollout id -> the counts of its current wave, kept as devices report."""

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
        view = self.devices.get(device_id)
        if view is not None:
            with self._changing(view):
                del self.devices[device_id]

    def on_presence(self, device_id: str, online: bool) -> None:
        view = self.device(device_id)
        with self._changing(view):
            view.online = online

    def on_state(self, state: DeviceState) -> None:
        view = self.device(state.device_id)
        with self._changing(view):
            view.state = state

    def on_health(self, report: HealthReport) -> bool:
        """Record a report; False for a duplicate or one older than the one held."""
        if not self._first_time(report.report_id):
            return False
        view = self.device(report.device_id)
        if view.health is not None and view.health.at > report.at:
            return False
        with self._changing(view):
            view.health = report
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

        Kept up to date as devices report (O(rollouts) per message): only the first
        call for a rollout's wave reads the whole fleet.
        """
        key = _wave_key(record)
        tally = self._tallies.get(record.id)
        if tally is None or tally.key != key:
            tally = _Tally(key, record)
            for view in self.devices.values():
                tally.add(self._part(record, view), 1)
            self._tallies[record.id] = tally
        return tally.counts()

    def watch_only(self, rollout_ids: Iterable[str]) -> None:
        """Stop counting for rollouts other than ``rollout_ids`` (the live ones)."""
        keep = set(rollout_ids)
        for rollout_id in [r for r in self._tallies if r not in keep]:
            del self._tallies[rollout_id]

    def _part(self, record: RolloutRecord, view: DeviceView) -> _Part:
        """What one device adds to the rollout's counts."""
        if not self.in_cohort(record, view):
            return _NOTHING
        candidate = record.candidates[view.hw_class or ""]
        report = view.health
        reported = (
            report is not None
            and report.rollout_id == record.id
            and report.release == candidate.release_id
            and is_verdict(report)
        )
        if not (view.online or reported):
            return (1, 0, 0, 0, 0)
        updated = view.state is not None and view.state.active_sha256 == candidate.artifact.sha256
        healthy = reported and report is not None and report.verdict is Verdict.HEALTHY
        return (1, 1, int(updated), int(healthy), int(reported and not healthy))

    @contextmanager
    def _changing(self, view: DeviceView) -> Iterator[None]:
        """Move ``view``'s part of every tally from before the change to after it."""
        tallies = list(self._tallies.values())
        before = [self._part(t.record, view) for t in tallies]
        yield
        present = self.devices.get(view.device_id) is view
        for tally, part in zip(tallies, before, strict=True):
            tally.add(part, -1)
            if present:
                tally.add(self._part(tally.record, view), 1)

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
