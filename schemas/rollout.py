"""Rollout messages: the operator's signed spec and the coordinator's status.

The spec is desired state with a generation number: pause, resume and abort are new
generations of the same retained spec. The status is what the coordinator observed
and decided; the state machine that produces it lives in ``coordinator.rollout``.
"""

from __future__ import annotations

import itertools
from enum import StrEnum
from typing import Annotated, Any, Final

from pydantic import Field, field_validator, model_validator

from schemas.codec import WireModel
from schemas.manifest import ArtifactRef, ShadowBudget, TensorSpec
from schemas.topics import NAME_PATTERN

__all__ = [
    "MAX_REASON_CHARS",
    "ROLLOUT_SPEC_KIND",
    "Candidate",
    "Cause",
    "Desired",
    "LanePhase",
    "LaneStatus",
    "MaintenanceWindow",
    "Phase",
    "RolloutSpec",
    "RolloutStatus",
    "Variant",
    "WaveCounts",
    "WaveSpec",
]

ROLLOUT_SPEC_KIND: Final = "rollout-spec"
MAX_REASON_CHARS: Final = 2000
MAX_SILENT_SHOWN: Final = 50
"""Silent devices a status names by id (the count says how many in all)."""
MINUTES_PER_DAY: Final = 24 * 60


class Desired(StrEnum):
    ACTIVE = "active"
    PAUSED = "paused"
    ABORTED = "aborted"


class Variant(WireModel):
    """One build of the candidate model (a precision, a graph optimisation), as
    published under ``artifacts/``, with the golden vectors made for it."""

    label: str = Field(pattern=NAME_PATTERN)
    artifact: ArtifactRef
    golden: ArtifactRef | None = None
    inputs: tuple[TensorSpec, ...] = Field(min_length=1)
    outputs: tuple[TensorSpec, ...] = Field(min_length=1)


class Candidate(WireModel):
    """The model the operator wants rolled out, in one or more variants: each class
    gets the one its profile calls for (``coordinator.variants``)."""

    name: str = Field(pattern=NAME_PATTERN)
    variants: tuple[Variant, ...] = Field(min_length=1, max_length=8)

    @field_validator("variants")
    @classmethod
    def _distinct(cls, variants: tuple[Variant, ...]) -> tuple[Variant, ...]:
        labels = [v.label for v in variants]
        if len(set(labels)) != len(labels):
            msg = f"variant labels repeat: {labels}"
            raise ValueError(msg)
        shas = [v.artifact.sha256 for v in variants]
        if len(set(shas)) != len(shas):
            msg = "two variants name the same artifact"
            raise ValueError(msg)
        return variants

    def artifacts(self) -> frozenset[str]:
        """The sha256 of every artifact the candidate names: models and golden sets."""
        return frozenset(v.artifact.sha256 for v in self.variants) | frozenset(
            v.golden.sha256 for v in self.variants if v.golden is not None
        )


class WaveSpec(WireModel):
    """One wave: how far it reaches and how it is judged.

    A wave reaches ``percent`` of each class (by the devices' stable buckets), or the
    first ``count`` devices of each class by bucket. What it leaves unset (None) is the
    spec's own value, else its classes' profile default.
    """

    percent: float | None = Field(default=None, gt=0.0, le=100.0, allow_inf_nan=False)
    count: int | None = Field(default=None, ge=1, le=10_000_000)
    min_soak_s: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)
    """Promote no sooner than this long after the wave's manifest went out."""
    success_ratio: float | None = Field(default=None, gt=0.0, le=1.0)
    max_failure_ratio: float | None = Field(default=None, ge=0.0, lt=1.0)
    silence_s: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    """A targeted device with no verdict this long after it was targeted counts as failed."""
    timeout_s: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_reach(self) -> WaveSpec:
        if (self.percent is None) == (self.count is None):
            msg = "a wave states either a percent or a count"
            raise ValueError(msg)
        return self

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else f"{self.count} devices"


class MaintenanceWindow(WireModel):
    """A daily window, in minutes after midnight UTC, in which a class may be newly
    targeted; ``end`` before ``start`` spans midnight."""

    start_minute: int = Field(ge=0, lt=MINUTES_PER_DAY)
    end_minute: int = Field(ge=0, lt=MINUTES_PER_DAY)

    @model_validator(mode="after")
    def _not_empty(self) -> MaintenanceWindow:
        if self.start_minute == self.end_minute:
            msg = "a maintenance window must not be empty"
            raise ValueError(msg)
        return self

    def open_at(self, now: float) -> bool:
        minute = int(now // 60) % MINUTES_PER_DAY
        if self.start_minute < self.end_minute:
            return self.start_minute <= minute < self.end_minute
        return minute >= self.start_minute or minute < self.end_minute

    def __str__(self) -> str:
        def hhmm(m: int) -> str:
            return f"{m // 60:02d}:{m % 60:02d}"

        return f"{hhmm(self.start_minute)}-{hhmm(self.end_minute)} UTC"


class RolloutSpec(WireModel):
    id: str = Field(pattern=NAME_PATTERN)
    generation: int = Field(ge=1)
    desired: Desired = Desired.ACTIVE
    classes: tuple[Annotated[str, Field(pattern=NAME_PATTERN)], ...] = Field(
        min_length=1, max_length=64
    )
    candidate: Candidate
    waves: tuple[WaveSpec, ...] = Field(
        default=(), min_length=1, max_length=20, validate_default=True
    )
    """Count waves first (increasing), then percent waves (increasing), the last at 100
    percent."""
    waves_percent: tuple[float, ...] = Field(default=(), exclude=True)
    """The waves' percents when every wave states one, else empty: never on the wire.
    Given instead of ``waves``, it is their shorthand (and how specs signed before waves
    were objects say them)."""
    canaries: tuple[Annotated[str, Field(pattern=NAME_PATTERN)], ...] = Field(
        default=(), max_length=1000
    )
    success_ratio: float | None = Field(default=None, gt=0.0, le=1.0)
    """Promote a wave when healthy >= success_ratio x targeted; None: the classes' default."""
    max_failure_ratio: float | None = Field(default=None, ge=0.0, lt=1.0)
    """Abort when (unhealthy + silent) / judged exceeds this; None: the classes' default."""
    wave_timeout_s: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    """None: the classes' default."""
    min_soak_s: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)
    silence_s: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    rate_per_min: int | None = Field(default=None, ge=1, le=1_000_000)
    """At most this many devices of a class newly targeted per minute; None: no limit."""
    shadow: ShadowBudget | None = None
    """Every class's candidate soaks in the shadow of its stable model, so judged; None:
    as the class's profile says."""
    all_or_nothing: bool = False
    """One class failing rolls every class back; none is promoted before all passed."""
    windows: dict[Annotated[str, Field(pattern=NAME_PATTERN)], MaintenanceWindow] = Field(
        default_factory=dict, max_length=64
    )
    """Class -> when it may be newly targeted; a class not named: any time."""
    issued_at: float
    operator: str = Field(max_length=64)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        percents = data.pop("waves_percent", None)
        if "waves" not in data and isinstance(percents, list | tuple):
            data["waves"] = [{"percent": p} for p in percents]
        elif percents is not None:
            msg = "give waves or waves_percent, not both"
            raise ValueError(msg)
        return data

    @field_validator("waves")
    @classmethod
    def _increasing(cls, waves: tuple[WaveSpec, ...]) -> tuple[WaveSpec, ...]:
        counts = [w.count for w in waves if w.count is not None]
        percents = [w.percent for w in waves if w.percent is not None]
        if counts and waves[len(counts) - 1].count is None:
            msg = "count waves must come before percent waves"
            raise ValueError(msg)
        if any(b <= a for a, b in itertools.pairwise(counts)) or any(
            b <= a for a, b in itertools.pairwise(percents)
        ):
            msg = "waves must increase"
            raise ValueError(msg)
        if waves[-1].percent != 100.0:
            msg = "the last wave must reach 100 percent"
            raise ValueError(msg)
        return waves

    @model_validator(mode="after")
    def _windows_of_classes(self) -> RolloutSpec:
        stray = sorted(set(self.windows) - set(self.classes))
        if stray:
            msg = f"maintenance windows for classes the rollout does not name: {stray[:5]}"
            raise ValueError(msg)
        return self

    @model_validator(mode="after")
    def _percents(self) -> RolloutSpec:
        percents = tuple(w.percent for w in self.waves if w.percent is not None)
        if len(percents) == len(self.waves):
            object.__setattr__(self, "waves_percent", percents)
        return self


class Phase(StrEnum):
    WAVE = "wave"
    PAUSED = "paused"
    COMPLETED = "completed"
    ROLLED_BACK = "rolled_back"
    REJECTED = "rejected"

    @property
    def final(self) -> bool:
        return self in {Phase.COMPLETED, Phase.ROLLED_BACK, Phase.REJECTED}


class LanePhase(StrEnum):
    """Where one class of a rollout is."""

    WAVE = "wave"
    PASSED = "passed"
    """Its last wave passed; waiting for the other classes (``all_or_nothing``)."""
    COMPLETED = "completed"
    """Promoted: the candidate is the class's stable release."""
    ROLLED_BACK = "rolled_back"

    @property
    def final(self) -> bool:
        return self in {LanePhase.COMPLETED, LanePhase.ROLLED_BACK}


class Cause(StrEnum):
    """Why a rollout is where it is: the machine-readable half of a status's reason
    (the text beside it is for people). Stable strings on the wire."""

    OPERATOR_ABORT = "operator_abort"
    OPERATOR_PAUSE = "operator_pause"
    UNHEALTHY = "unhealthy"
    """More of the wave's reporting devices are unhealthy than ``max_failure_ratio``."""
    PROMOTED = "promoted"
    """Enough of the wave's targeted devices are healthy: the next wave, or completion."""
    EMPTY_WAVE = "empty_wave"
    """An early wave that holds no device, passed over."""
    TIMED_OUT = "timed_out"
    SILENT = "silent"
    """Targeted devices that went silent (offline, or online with no verdict) past the
    wave's silence limit, more than ``max_failure_ratio`` allows."""
    OTHER_CLASS_FAILED = "other_class_failed"
    """Rolled back with the rest of an ``all_or_nothing`` rollout."""
    SPEC_REFUSED = "spec_refused"
    """Spec bytes that cannot be acted on (signature, schema, replayed under another id)."""
    CLASSES_UNAVAILABLE = "classes_unavailable"
    """Classes no profile knows, or that another rollout holds."""
    ARTIFACT_UNAVAILABLE = "artifact_unavailable"
    """An artifact the spec names could not be fetched whole and checked in time."""
    INVALID_CANDIDATE = "invalid_candidate"
    """A variant does not load, lies about its inputs or outputs, fails its golden
    vectors, or some class has no fitting variant."""
    GATE_FAILED = "gate_failed"
    """Some class has no variant that passes its accuracy gate."""


class WaveCounts(WireModel):
    members: int = 0
    """Devices known to be in the wave, online or not."""
    targeted: int = 0
    """Members that were online since the wave's manifest went out, or that reported."""
    updated: int = 0
    healthy: int = 0
    unhealthy: int = 0
    silent: int = 0
    """Targeted, no verdict, and past the wave's silence limit: counted as failed."""
    pending: int = 0
    """Members offline since the wave's manifest went out: not waited for."""
    shadow_inferences: int = 0
    """Shadow-soak answers the wave's reports rest on (see ``agreement``)."""
    agreed: int = 0
    """Of which agreed with the stable model's."""

    @property
    def agreement(self) -> float | None:
        """The wave's agreement over its reports' shadow soaks; None without any."""
        return self.agreed / self.shadow_inferences if self.shadow_inferences else None

    @property
    def reported(self) -> int:
        return self.healthy + self.unhealthy

    @property
    def failed(self) -> int:
        return self.unhealthy + self.silent

    @property
    def judged(self) -> int:
        return self.healthy + self.unhealthy + self.silent

    def __add__(self, other: WaveCounts) -> WaveCounts:
        return WaveCounts(
            members=self.members + other.members,
            targeted=self.targeted + other.targeted,
            updated=self.updated + other.updated,
            healthy=self.healthy + other.healthy,
            unhealthy=self.unhealthy + other.unhealthy,
            silent=self.silent + other.silent,
            pending=self.pending + other.pending,
            shadow_inferences=self.shadow_inferences + other.shadow_inferences,
            agreed=self.agreed + other.agreed,
        )


class LaneStatus(WireModel):
    """One class of a rollout: its own wave, counts and verdict."""

    phase: LanePhase
    wave: int
    cutoff_bp: int
    """The bucket cutoff its manifest carries now (below the wave's when paced)."""
    counts: WaveCounts
    silent: tuple[str, ...] = Field(default=(), max_length=MAX_SILENT_SHOWN)
    """Silent devices by id, the first ``MAX_SILENT_SHOWN`` in order."""
    reason: str | None = Field(default=None, max_length=MAX_REASON_CHARS)
    cause: Cause | None = None
    waiting: str | None = Field(default=None, max_length=200)
    """Why the class is not newly targeting devices now (a paced wave, a closed
    maintenance window), if it is not."""


class RolloutStatus(WireModel):
    id: str
    generation: int
    phase: Phase
    wave: int
    """Index of the current wave (0-based); equal to the number of waves when done."""
    waves_percent: tuple[float, ...]
    """The waves' percents when every wave states one; see ``waves``."""
    counts: WaveCounts
    """The sum of the classes' counts."""
    classes: tuple[str, ...]
    release: str | None = None
    releases: dict[str, str] = Field(default_factory=dict)
    """Class -> the release id (name, variant, digest) its manifest names."""
    reason: str | None = Field(default=None, max_length=MAX_REASON_CHARS)
    cause: Cause | None = None
    """What ``reason`` says, for machines; None when there is no reason, or from a
    coordinator that did not send one."""
    waves: tuple[WaveSpec, ...] = ()
    lanes: dict[str, LaneStatus] = Field(default_factory=dict)
    """Class -> its own progress (empty from a coordinator that did not send them)."""
    updated_at: float
