"""A rollout as the coordinator's store keeps it: the record, one :class:`Lane` per
class, and the :class:`Policy` that judges a class's waves. Data only; the state machine
that moves them is :mod:`coordinator.rollout`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from schemas import (
    Cause,
    Desired,
    LanePhase,
    MaintenanceWindow,
    Phase,
    Release,
    WaveCounts,
    WaveSpec,
)

__all__ = ["Lane", "Policy", "RolloutRecord"]


class Policy(BaseModel):
    """What judges a class's waves where the wave itself leaves it unset: the spec's
    own values, else the class profile's defaults."""

    model_config = ConfigDict(frozen=True)

    success_ratio: float
    max_failure_ratio: float
    timeout_s: float
    min_soak_s: float = 0.0
    silence_s: float

    def for_wave(self, wave: WaveSpec) -> Policy:
        """This policy with ``wave``'s own values over it."""
        own = {
            "success_ratio": wave.success_ratio,
            "max_failure_ratio": wave.max_failure_ratio,
            "timeout_s": wave.timeout_s,
            "min_soak_s": wave.min_soak_s,
            "silence_s": wave.silence_s,
        }
        return self.model_copy(update={k: v for k, v in own.items() if v is not None})


class Lane(BaseModel):
    """One class of a rollout, as the store keeps it."""

    model_config = ConfigDict(frozen=True)

    phase: LanePhase = LanePhase.WAVE
    wave: int = 0
    target_bp: int | None = None
    """The current wave's cutoff; None until the wave is entered (on a complete view)."""
    cutoff_bp: int = 0
    """The cutoff its manifest carries: below the target while paced or outside a window."""
    entered_at: float = 0.0
    entered_covered: int = 0
    """Devices below the cutoff when the wave was entered: the base of its pacing."""
    published_at: float | None = None
    """When the manifest carrying the target went out: the wave's clock."""
    counts: WaveCounts = WaveCounts()
    reason: str | None = None
    cause: Cause | None = None
    waiting: str | None = None
    """Why the cutoff is below the target now, if it is."""
    policy: Policy

    @property
    def live(self) -> bool:
        return not self.phase.final


class RolloutRecord(BaseModel):
    """A rollout as the coordinator's store keeps it."""

    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    id: str
    generation: int
    spec: bytes
    """The operator-signed spec bytes, kept for audit."""
    classes: tuple[str, ...]
    candidates: dict[str, Release]
    waves: tuple[WaveSpec, ...]
    canaries: tuple[str, ...]
    rate_per_min: int | None = None
    all_or_nothing: bool = False
    windows: dict[str, MaintenanceWindow] = {}
    lanes: dict[str, Lane]
    desired: Desired = Desired.ACTIVE
    phase: Phase
    reason: str | None = None
    """The text of the last reason recorded, as the status shows it."""
    cause: Cause | None = None
    """Its cause; None in records stored before causes were (their text stands alone)."""
    updated_at: float
    started: bool = True
    """False while a rollout admitted paused has not yet been resumed: no manifest
    carries it before then."""

    @model_validator(mode="before")
    @classmethod
    def _from_one_lane(cls, data: Any) -> Any:
        """A record stored before classes had lanes: every class gets the lane its one
        wave, clock and ratios described."""
        if not isinstance(data, dict) or "lanes" in data or "waves_percent" not in data:
            return data
        data = dict(data)
        percents = data.pop("waves_percent")
        data["waves"] = [{"percent": p} for p in percents]
        timeout = data.pop("wave_timeout_s")
        policy = Policy(  # no silence limit then: the wave's timeout is the closest
            success_ratio=data.pop("success_ratio"),
            max_failure_ratio=data.pop("max_failure_ratio"),
            timeout_s=timeout,
            silence_s=timeout,
        )
        wave, started_at = data.pop("wave", 0), data.pop("wave_started_at", 0.0)
        data.pop("counts", None)
        last = len(percents) - 1
        data["lanes"] = {
            name: Lane(
                wave=min(wave, last),
                entered_at=started_at,
                published_at=started_at,
                policy=policy,
                phase=_lane_phase(Phase(data["phase"])),
            )
            for name in data.get("classes", ())
        }
        return data

    @property
    def release_id(self) -> str:
        return next(iter(self.candidates.values())).release_id

    @property
    def wave(self) -> int:
        """The earliest wave of a live class; once none is, the earliest wave rolled back
        (the number of waves when every class completed)."""
        live = [lane.wave for lane in self.lanes.values() if lane.live]
        back = [x.wave for x in self.lanes.values() if x.phase is LanePhase.ROLLED_BACK]
        return min(live or back or [len(self.waves)])

    @property
    def counts(self) -> WaveCounts:
        total = WaveCounts()
        for lane in self.lanes.values():
            total += lane.counts
        return total

    def lane(self, name: str) -> Lane:
        return self.lanes[name]


def _lane_phase(phase: Phase) -> LanePhase:
    if phase is Phase.COMPLETED:
        return LanePhase.COMPLETED
    if phase in (Phase.ROLLED_BACK, Phase.REJECTED):
        return LanePhase.ROLLED_BACK
    return LanePhase.WAVE
