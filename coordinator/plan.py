"""A rollout's dry run: what each wave of a spec would reach in the fleet as it reports now.

Events in, plan out, ``now`` passed in; pure, so ``edgefleet rollout plan`` reads the
retained fleet state and the variants first, and the tests build both by hand.

Who a wave reaches follows the coordinator's own rule (``coordinator.waves``): a class's
devices are ordered by their bucket, salted with the rollout id; a wave covers those below
its cutoff (a percent's, or the one that reaches the first ``count`` devices of the class)
and the canaries, and a wave never covers fewer than the one before. Each device is counted
once, in the wave that first reaches it: offline devices are not waited for (``pending``)
and pull their bytes when they come back; a device that already runs the artifact its class
would get pulls nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from coordinator.waves import wave_cutoff
from schemas import RolloutSpec, WaveSpec, bucket

__all__ = [
    "ClassOffer",
    "ClassWave",
    "DeviceFacts",
    "Plan",
    "WavePlan",
    "WaveTerms",
    "make_plan",
]


class DeviceFacts(Protocol):
    """What the plan needs of a device (``coordinator.operator.DeviceRow`` has it)."""

    @property
    def device_id(self) -> str: ...
    @property
    def hw_class(self) -> str | None: ...
    @property
    def online(self) -> bool: ...
    @property
    def sha256(self) -> str | None:
        """The artifact it runs now."""


@dataclass(frozen=True, kw_only=True)
class ClassOffer:
    """What one class of the rollout would get, as far as the operator's side can tell."""

    hw_class: str
    variant: str | None
    """The variant's label; None when none fits or passes, or it cannot be told here."""
    release: str | None = None
    sha256: str | None = None
    pull_bytes: int | None = None
    """Bytes one device fetches for it: the model and its golden vectors."""
    gate: str = ""
    """What the accuracy gate measured, or why it did not run here."""
    refusal: str | None = None
    """Why the coordinator would refuse the rollout for this class; None if it would not."""


@dataclass(frozen=True, kw_only=True)
class WaveTerms:
    """How a wave is judged, as the spec states it; None: the classes' profile default."""

    min_soak_s: float | None
    success_ratio: float | None
    max_failure_ratio: float | None
    silence_s: float | None
    timeout_s: float | None


@dataclass(frozen=True, kw_only=True)
class ClassWave:
    """One class in one wave."""

    hw_class: str
    cutoff_bp: int
    reached: int
    """Devices of the class this wave covers in all (earlier waves' included)."""
    new: tuple[str, ...]
    """Online devices this wave reaches first (canaries in the first wave)."""
    offline: tuple[str, ...]
    """Offline devices this wave reaches first: not waited for, they converge later."""
    already: int
    """Of ``new`` and ``offline``, how many run the class's artifact already."""
    pull_bytes: int | None
    """What ``new`` pulls during the wave; None when the class's artifact is not known."""
    later_bytes: int | None
    """What ``offline`` pulls when those devices come back."""
    paced_minutes: int | None
    """With a rate, the fewest minutes it takes to target every device the wave adds."""


@dataclass(frozen=True, kw_only=True)
class WavePlan:
    index: int
    reach: str
    percent: float | None
    count: int | None
    terms: WaveTerms
    classes: tuple[ClassWave, ...]

    @property
    def new(self) -> int:
        return sum(len(c.new) for c in self.classes)

    @property
    def offline(self) -> int:
        return sum(len(c.offline) for c in self.classes)

    @property
    def pull_bytes(self) -> int | None:
        """Bytes the wave pulls while it runs; None when some class's is not known."""
        parts = [c.pull_bytes for c in self.classes]
        return None if None in parts else sum(p or 0 for p in parts)


@dataclass(frozen=True, kw_only=True)
class Plan:
    rollout_id: str
    classes: tuple[str, ...]
    offers: tuple[ClassOffer, ...]
    waves: tuple[WavePlan, ...]
    canaries: tuple[str, ...]
    unknown_canaries: tuple[str, ...]
    """Canaries no device of the rollout's classes reports as: they reach nobody now."""
    unclassified: tuple[str, ...]
    """Devices with no retained state: no wave counts them until they report a class."""
    never_seen: Mapping[str, tuple[str, ...]]
    """Class -> enrolled devices that never reported: they converge when they first do."""
    notes: tuple[str, ...]
    refusals: tuple[str, ...]
    """Why the coordinator would refuse the spec; empty when, as far as seen, it would not."""


def make_plan(
    spec: RolloutSpec,
    devices: Iterable[DeviceFacts],
    offers: Mapping[str, ClassOffer],
    *,
    now: float,
    held: Mapping[str, str] | None = None,
    enrolled: Mapping[str, str] | None = None,
) -> Plan:
    """The plan of ``spec`` over ``devices`` (the fleet as its retained topics show it).

    ``offers``: class -> what it would get; ``held``: class -> the rollout that holds it
    now; ``enrolled``: device id -> class, of every enrolled device (to name those that
    never reported)."""
    by_class: dict[str, list[DeviceFacts]] = {name: [] for name in spec.classes}
    unclassified: list[str] = []
    known: set[str] = set()
    for device in devices:
        known.add(device.device_id)
        if device.hw_class is None:
            unclassified.append(device.device_id)
        elif device.hw_class in by_class:
            by_class[device.hw_class].append(device)
    canaries = {d.device_id for members in by_class.values() for d in members} & set(spec.canaries)
    lanes = {
        name: _class_waves(spec, name, members, offers.get(name), canaries)
        for name, members in by_class.items()
    }
    waves = tuple(
        WavePlan(
            index=i,
            reach=_reach(wave),
            percent=wave.percent,
            count=wave.count,
            terms=_terms(spec, wave),
            classes=tuple(lanes[name][i] for name in spec.classes),
        )
        for i, wave in enumerate(spec.waves)
    )
    never_seen = {
        name: tuple(sorted(d for d, c in (enrolled or {}).items() if c == name and d not in known))
        for name in spec.classes
    }
    return Plan(
        rollout_id=spec.id,
        classes=spec.classes,
        offers=tuple(offers[name] for name in spec.classes if name in offers),
        waves=waves,
        canaries=tuple(c for c in spec.canaries if c in canaries),
        unknown_canaries=tuple(c for c in spec.canaries if c not in canaries),
        unclassified=tuple(sorted(unclassified)),
        never_seen={name: ids for name, ids in never_seen.items() if ids},
        notes=tuple(_notes(spec, now, by_class)),
        refusals=tuple(_refusals(spec, offers, held or {})),
    )


def _class_waves(
    spec: RolloutSpec,
    name: str,
    members: Sequence[DeviceFacts],
    offer: ClassOffer | None,
    canaries: set[str],
) -> list[ClassWave]:
    """Each wave of one class: devices in bucket order, walked once."""
    ranked = sorted((bucket(spec.id, d.device_id), d.device_id, d) for d in members)
    buckets = [b for b, _, _ in ranked]
    queue = [(b, d) for b, device_id, d in ranked if device_id not in canaries]
    first = [d for d in members if d.device_id in canaries]
    waves = []
    cutoff = 0
    at = 0
    for i, wave in enumerate(spec.waves):
        cutoff = max(cutoff, wave_cutoff(wave, buckets))
        reached = list(first) if i == 0 else []
        while at < len(queue) and queue[at][0] < cutoff:
            reached.append(queue[at][1])
            at += 1
        waves.append(
            _class_wave(
                spec, name, cutoff=cutoff, reached=reached, total=at + len(first), offer=offer
            )
        )
    return waves


def _class_wave(
    spec: RolloutSpec,
    name: str,
    *,
    cutoff: int,
    reached: Sequence[DeviceFacts],
    total: int,
    offer: ClassOffer | None,
) -> ClassWave:
    sha = None if offer is None else offer.sha256
    size = None if offer is None else offer.pull_bytes
    online = [d for d in reached if d.online]
    offline = [d for d in reached if not d.online]
    already = sum(1 for d in reached if sha is not None and d.sha256 == sha)

    def pulled(group: Sequence[DeviceFacts]) -> int | None:
        if size is None:
            return None
        return size * sum(1 for d in group if sha is None or d.sha256 != sha)

    rate = spec.rate_per_min
    return ClassWave(
        hw_class=name,
        cutoff_bp=cutoff,
        reached=total,
        new=tuple(d.device_id for d in online),
        offline=tuple(d.device_id for d in offline),
        already=already,
        pull_bytes=pulled(online),
        later_bytes=pulled(offline),
        paced_minutes=None if rate is None or not reached else math.ceil(len(reached) / rate),
    )


def _reach(wave: WaveSpec) -> str:
    if wave.count is not None:
        return f"the first {wave.count} of each class"
    return f"{wave.percent:g}% of each class"


def _terms(spec: RolloutSpec, wave: WaveSpec) -> WaveTerms:
    def first(*values: float | None) -> float | None:
        return next((v for v in values if v is not None), None)

    return WaveTerms(
        min_soak_s=first(wave.min_soak_s, spec.min_soak_s),
        success_ratio=first(wave.success_ratio, spec.success_ratio),
        max_failure_ratio=first(wave.max_failure_ratio, spec.max_failure_ratio),
        silence_s=first(wave.silence_s, spec.silence_s),
        timeout_s=first(wave.timeout_s, spec.wave_timeout_s),
    )


def _notes(
    spec: RolloutSpec, now: float, by_class: Mapping[str, Sequence[DeviceFacts]]
) -> list[str]:
    notes = [f"{name}: no device reports this class" for name, m in by_class.items() if not m]
    if spec.rate_per_min is not None:
        notes.append(
            f"paced: at most {spec.rate_per_min} devices of a class newly targeted a minute"
        )
    for name in spec.classes:
        window = spec.windows.get(name)
        if window is not None:
            state = "open" if window.open_at(now) else "closed"
            notes.append(f"{name}: newly targeted only {window} ({state} now)")
    if spec.all_or_nothing:
        notes.append("all or nothing: one class failing rolls every class back")
    return notes


def _refusals(
    spec: RolloutSpec, offers: Mapping[str, ClassOffer], held: Mapping[str, str]
) -> list[str]:
    refusals = [
        f"{name}: in rollout {held[name]} until it ends" for name in spec.classes if name in held
    ]
    return refusals + [
        offer.refusal
        for name in spec.classes
        if (offer := offers.get(name)) is not None and offer.refusal is not None
    ]
