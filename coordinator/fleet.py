"""What the coordinator knows of the fleet, rebuilt from retained device topics.

Health reports arrive at least once (QoS 1), so they are de-duplicated by their ids:
consumers are idempotent. Telemetry is counted by ``coordinator.ledger``.
"""

from __future__ import annotations

import bisect
import heapq
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import overload

from coordinator.rollout import LaneInput, RolloutRecord
from schemas import DeviceState, HealthReport, Verdict, WaveCounts, bucket
from schemas.errors import Reason, bound_text

__all__ = ["Census", "DeviceView", "FleetView", "agreed_of", "is_verdict"]

_TRANSIENT: frozenset[str] = frozenset({Reason.CHUNK_CORRUPT.value, Reason.FETCH_TIMEOUT.value})
"""Report reasons about the transfer, not the candidate: a corrupt or missing chunk is
fetched again and says nothing about the model."""


def is_verdict(report: HealthReport) -> bool:
    """False for an unhealthy report whose every reason is a transfer problem."""
    if report.verdict is Verdict.HEALTHY or not report.reasons:
        return True
    return any(r.split(":", 1)[0].strip() not in _TRANSIENT for r in report.reasons)


def agreed_of(report: HealthReport) -> tuple[int, int]:
    """The shadow-soak answers a report rests on, and how many of them agreed."""
    if report.agreement is None:
        return 0, 0
    return report.shadow_inferences, round(report.agreement * report.shadow_inferences)


@dataclass
class DeviceView:
    device_id: str
    online: bool = False
    state: DeviceState | None = None
    health: HealthReport | None = None
    seen_until: float | None = None
    """When it was last known online, if it is offline now (the fleet view's clock)."""

    @property
    def hw_class(self) -> str | None:
        return None if self.state is None else self.state.hw_class


Census = tuple[str, str, str, bool]
"""What the fleet view counts devices by: class, active release, mode (``""`` when the
device has not said) and whether it is online."""


def _census(view: DeviceView) -> Census:
    state = view.state
    if state is None:
        return ("", "", "", view.online)
    return (state.hw_class, state.active_release or "", state.mode.value, view.online)


_Part = tuple[int, int, int, int, int, int, int, int, int]
"""One device's part of a wave's counts, in the order of :class:`schemas.WaveCounts`:
members, targeted, updated, healthy, unhealthy, silent, pending, shadow_inferences,
agreed."""
_NOTHING: _Part = (0, 0, 0, 0, 0, 0, 0, 0, 0)


class _Ranked(Sequence[int]):
    """The devices of one class, sorted by their bucket for one rollout: the engine's
    ``ranked`` buckets, and the devices a raised cutoff newly covers."""

    def __init__(self, salt: str) -> None:
        self.salt = salt
        self.pairs: list[tuple[int, str]] = []

    def add(self, device_id: str) -> None:
        bisect.insort(self.pairs, (bucket(self.salt, device_id), device_id))

    def remove(self, device_id: str) -> None:
        pair = (bucket(self.salt, device_id), device_id)
        index = bisect.bisect_left(self.pairs, pair)
        if index < len(self.pairs) and self.pairs[index] == pair:
            del self.pairs[index]

    def between(self, low: int, high: int) -> list[str]:
        """The devices with ``low <= bucket < high``."""
        start = bisect.bisect_left(self.pairs, (low, ""))
        end = bisect.bisect_left(self.pairs, (high, ""))
        return [device_id for _, device_id in self.pairs[start:end]]

    def __len__(self) -> int:
        return len(self.pairs)

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[int]: ...
    def __getitem__(self, index: int | slice) -> int | Sequence[int]:
        if isinstance(index, slice):
            return [b for b, _ in self.pairs[index]]
        return self.pairs[index][0]


def _lane_key(record: RolloutRecord, name: str) -> tuple[object, ...]:
    """Everything of a lane that decides who counts how, but its cutoff (a raised
    cutoff only adds devices): a tally is rebuilt when it changes."""
    lane, release = record.lanes[name], record.candidates[name]
    return (
        record.canaries,
        release.release_id,
        release.artifact.sha256,
        lane.wave,
        lane.published_at,
        lane.policy.for_wave(record.waves[lane.wave]).silence_s,
    )


class _Tally:
    """One class's wave of one rollout: its counts, summed from every device's part, and
    who was targeted when."""

    def __init__(self, key: tuple[object, ...], record: RolloutRecord, name: str) -> None:
        self.key = key
        self.record = record
        self.name = name
        lane = record.lanes[name]
        self.cutoff = lane.cutoff_bp
        self.published_at = lane.published_at
        self.published = lane.published_at is not None
        self.silence_s = lane.policy.for_wave(record.waves[lane.wave]).silence_s
        self.candidate = record.candidates[name]
        self.targeted: dict[str, float] = {}
        """Device -> when it was first online (or reported) since the wave's manifest
        went out: its silence limit counts from then."""
        self.deadlines: list[tuple[float, str]] = []
        """A heap of (silence deadline, device)."""
        self.silent: set[str] = set()
        self._sums = [0] * len(_NOTHING)

    def add(self, part: _Part, sign: int) -> None:
        if part is not _NOTHING:
            for i, value in enumerate(part):
                self._sums[i] += sign * value

    def counts(self) -> WaveCounts:
        members, targeted, updated, healthy, unhealthy, silent, pending, shadowed, agreed = (
            self._sums
        )
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

    def in_cohort(self, view: DeviceView) -> bool:
        if view.hw_class != self.name:
            return False
        if view.device_id in self.record.canaries:
            return True
        return bucket(self.record.id, view.device_id) < self.cutoff

    def reported(self, view: DeviceView) -> bool:
        report = view.health
        return (
            report is not None
            and report.rollout_id == self.record.id
            and report.release == self.candidate.release_id
            and is_verdict(report)
        )

    def target(self, view: DeviceView, now: float) -> None:
        """Note ``view`` as targeted if it is a member to ask, and not yet: from ``now``
        if it is online, or from the wave's start if it went offline since then."""
        device_id, start = view.device_id, self.published_at
        if start is None or device_id in self.targeted or not self.in_cohort(view):
            return
        if view.online or self.reported(view):
            at = now
        elif (view.seen_until is not None and view.seen_until >= start) or self.took(view):
            at = start  # online when the manifest went out, gone before we looked
        else:
            return
        self.targeted[device_id] = at
        heapq.heappush(self.deadlines, (at + self.silence_s, device_id))

    def took(self, view: DeviceView) -> bool:
        """Whether the device's own retained state says it took the candidate up: it
        saw the manifest, whatever this process saw of it (a coordinator restarted
        while the device died)."""
        state = view.state
        return (
            state is not None
            and state.rollout_id == self.record.id
            and state.target_release == self.candidate.release_id
        )

    def part(self, view: DeviceView) -> _Part:
        """What one device adds to the counts."""
        if not self.in_cohort(view):
            return _NOTHING
        state = view.state
        updated = int(state is not None and state.active_sha256 == self.candidate.artifact.sha256)
        report = view.health
        if report is not None and self.reported(view):
            healthy = report.verdict is Verdict.HEALTHY
            shadowed, agreed = agreed_of(report)
            return (1, 1, updated, int(healthy), int(not healthy), 0, 0, shadowed, agreed)
        if view.device_id in self.targeted:
            return (1, 1, updated, 0, 0, int(view.device_id in self.silent), 0, 0, 0)
        return (1, 0, updated, 0, 0, 0, int(self.published and not view.online), 0, 0)


@dataclass
class FleetView:
    seen_kept: int = 100_000
    """Report ids remembered for de-duplication, newest kept."""
    device_reason_chars: int = 300
    """One device's part of a rollback reason: several fit in the status's reason."""
    unhealthy_quoted: int = 3
    """Unhealthy devices a rollback quotes."""
    devices: dict[str, DeviceView] = field(default_factory=dict)
    """Changed only through the ``on_*`` methods and :meth:`forget`, which keep the
    counts."""
    now: float = 0.0
    """The time of the last :meth:`tick`: devices are targeted as of then."""
    _seen: OrderedDict[str, None] = field(default_factory=OrderedDict)
    _tallies: dict[tuple[str, str], _Tally] = field(default_factory=dict)
    """(rollout id, class) -> the counts of that class's current wave, kept as devices
    report."""
    _ranks: dict[str, dict[str, _Ranked]] = field(default_factory=dict)
    """Class -> rollout id -> its devices by bucket, kept as devices come and go."""
    _census: Counter[Census] = field(default_factory=Counter)
    """Devices by class, release, mode and online, kept as they change (O(1) each)."""
    _counted: dict[str, Census] = field(default_factory=dict)
    """Device -> what it is counted as in ``_census``."""
    changed_at: float | None = None
    """The first tick after the last change of any device (presence, state, health):
    how old what the view knows is, within a tick."""
    _changed: bool = False

    def census(self) -> dict[Census, int]:
        """How many devices there are of each class, release, mode and online state:
        O(the distinct combinations), not O(the fleet)."""
        return dict(self._census)

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
            if view.online and not online:
                view.seen_until = self.now
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

    # -- counting -------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Devices that come online are targeted as of ``now``; every targeted device
        without a verdict past its silence limit is silent from now on. O(expired)."""
        self.now = now
        if self._changed:
            self.changed_at, self._changed = now, False
        for tally in self._tallies.values():
            while tally.deadlines and tally.deadlines[0][0] <= now:
                deadline, device_id = heapq.heappop(tally.deadlines)
                view = self.devices.get(device_id)
                if (
                    view is None
                    or tally.targeted.get(device_id, -1.0) + tally.silence_s != deadline
                    or tally.reported(view)
                ):
                    continue
                tally.add(tally.part(view), -1)
                tally.silent.add(device_id)
                tally.add(tally.part(view), 1)

    def lane(self, record: RolloutRecord, name: str) -> LaneInput:
        """What the engine needs of one class of a rollout: the counts of its current
        wave, its devices by bucket, and the words of its unhealthy devices.

        Kept up to date as devices report (O(rollouts) per message): only the first
        call for a class's wave reads the whole fleet.
        """
        tally = self._tally(record, name)
        quoted = self.unhealthy_quoted
        return LaneInput(
            counts=tally.counts(),
            ranked=self._ranked(record.id, name),
            unhealthy=lambda: self.unhealthy_reasons(record, name, quoted),
        )

    def counts(self, record: RolloutRecord, name: str) -> WaveCounts:
        return self._tally(record, name).counts()

    def silent(self, record: RolloutRecord, name: str, limit: int) -> list[str]:
        """The first ``limit`` silent devices of the class's wave, by id."""
        tally = self._tallies.get((record.id, name))
        if tally is None:
            return []
        still = (
            d for d in tally.silent if d in self.devices and not tally.reported(self.devices[d])
        )
        return sorted(still)[:limit]

    def watch_only(self, records: Iterable[RolloutRecord]) -> None:
        """Stop counting for rollouts and classes other than the live ones given."""
        keep = {(r.id, n) for r in records for n, lane in r.lanes.items() if lane.live}
        for key in [k for k in self._tallies if k not in keep]:
            del self._tallies[key]
        for name, ranks in self._ranks.items():
            for rollout_id in [r for r in ranks if (r, name) not in keep]:
                del ranks[rollout_id]

    def _ranked(self, rollout_id: str, name: str) -> _Ranked:
        ranks = self._ranks.setdefault(name, {})
        ranked = ranks.get(rollout_id)
        if ranked is None:
            ranked = ranks[rollout_id] = _Ranked(rollout_id)
            for view in self.devices.values():
                if view.hw_class == name:
                    ranked.add(view.device_id)
        return ranked

    def _tally(self, record: RolloutRecord, name: str) -> _Tally:
        key = _lane_key(record, name)
        tally = self._tallies.get((record.id, name))
        if tally is None or tally.key != key:
            tally = _Tally(key, record, name)
            for view in self.devices.values():
                tally.target(view, self.now)
                tally.add(tally.part(view), 1)
            self._tallies[(record.id, name)] = tally
        elif tally.record is not record:
            tally.record = record
            cutoff = record.lanes[name].cutoff_bp
            if cutoff > tally.cutoff:
                self._widen(tally, cutoff)
        return tally

    def _widen(self, tally: _Tally, cutoff: int) -> None:
        """A paced cutoff raised: the devices it newly covers join the counts."""
        newly = self._ranked(tally.record.id, tally.name).between(tally.cutoff, cutoff)
        tally.cutoff = cutoff
        for device_id in newly:
            view = self.devices[device_id]
            if view.device_id not in tally.record.canaries:
                tally.target(view, self.now)
                tally.add(tally.part(view), 1)

    @contextmanager
    def _changing(self, view: DeviceView) -> Iterator[None]:
        """Move ``view``'s part of every tally of its class from before the change to
        after it, and keep the classes' rankings."""
        was = view.hw_class
        before = {key: t.part(view) for key, t in self._tallies.items() if t.name == was}
        yield
        present = self.devices.get(view.device_id) is view
        now = view.hw_class if present else None
        self._recount(view, present)
        if now != was:
            for ranked in self._ranks.get(was or "", {}).values():
                ranked.remove(view.device_id)
            for ranked in self._ranks.get(now or "", {}).values():
                ranked.add(view.device_id)
        for key, tally in self._tallies.items():
            if tally.name not in (was, now):
                continue
            tally.add(before.get(key, _NOTHING), -1)
            if present:
                tally.target(view, self.now)
                tally.add(tally.part(view), 1)

    def _recount(self, view: DeviceView, present: bool) -> None:
        """Move ``view`` in the census to what it is now (out of it, if it is gone)."""
        self._changed = True
        key = _census(view) if present else None
        was = self._counted.get(view.device_id)
        if key == was:
            return
        if was is not None:
            self._census[was] -= 1
            if not self._census[was]:
                del self._census[was]
        if key is None:
            del self._counted[view.device_id]
        else:
            self._counted[view.device_id] = key
            self._census[key] += 1

    def in_cohort(self, record: RolloutRecord, view: DeviceView) -> bool:
        """Whether the class's manifest sends ``view`` the candidate now."""
        name = view.hw_class
        if name is None or name not in record.lanes:
            return False
        if view.device_id in record.canaries:
            return True
        return bucket(record.id, view.device_id) < record.lanes[name].cutoff_bp

    def unhealthy_reasons(self, record: RolloutRecord, name: str, limit: int = 3) -> list[str]:
        """``device: reason`` for the first unhealthy reports on the class's wave."""
        found = []
        candidate = record.candidates[name]
        for view in sorted(self.devices.values(), key=lambda v: v.device_id):
            report = view.health
            if (
                view.hw_class == name
                and self.in_cohort(record, view)
                and report is not None
                and report.rollout_id == record.id
                and report.release == candidate.release_id
                and report.verdict is Verdict.UNHEALTHY
                and is_verdict(report)
            ):
                # Reasons are the device's own words: bounded here, where they are quoted.
                said = ", ".join(report.reasons) or "unhealthy"
                found.append(bound_text(f"{view.device_id}: {said}", self.device_reason_chars))
                if len(found) >= limit:
                    break
        return found
