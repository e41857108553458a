"""Rollout messages: the operator's signed spec and the coordinator's status.

The spec is desired state with a generation number: pause, resume and abort are new
generations of the same retained spec. The status is what the coordinator observed
and decided; the state machine that produces it lives in ``coordinator.rollout``.
"""

from __future__ import annotations

import itertools
from enum import StrEnum
from typing import Annotated, Final

from pydantic import Field, field_validator

from schemas.codec import WireModel
from schemas.manifest import ArtifactRef, TensorSpec
from schemas.topics import NAME_PATTERN

__all__ = [
    "MAX_REASON_CHARS",
    "ROLLOUT_SPEC_KIND",
    "Candidate",
    "Cause",
    "Desired",
    "Phase",
    "RolloutSpec",
    "RolloutStatus",
    "Variant",
    "WaveCounts",
]

ROLLOUT_SPEC_KIND: Final = "rollout-spec"
MAX_REASON_CHARS: Final = 2000


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


class RolloutSpec(WireModel):
    id: str = Field(pattern=NAME_PATTERN)
    generation: int = Field(ge=1)
    desired: Desired = Desired.ACTIVE
    classes: tuple[Annotated[str, Field(pattern=NAME_PATTERN)], ...] = Field(
        min_length=1, max_length=64
    )
    candidate: Candidate
    waves_percent: tuple[float, ...] = Field(min_length=1, max_length=20)
    canaries: tuple[Annotated[str, Field(pattern=NAME_PATTERN)], ...] = Field(
        default=(), max_length=1000
    )
    success_ratio: float | None = Field(default=None, gt=0.0, le=1.0)
    """Promote a wave when healthy >= success_ratio x targeted; None: the classes' default."""
    max_failure_ratio: float | None = Field(default=None, ge=0.0, lt=1.0)
    """Abort when unhealthy / reported exceeds this; None: the classes' default."""
    wave_timeout_s: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    """None: the classes' default."""
    issued_at: float
    operator: str = Field(max_length=64)

    @field_validator("waves_percent")
    @classmethod
    def _increasing(cls, waves: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0.0 < w <= 100.0 for w in waves):
            msg = "wave percentages must lie in (0, 100]"
            raise ValueError(msg)
        if any(b <= a for a, b in itertools.pairwise(waves)):
            msg = "wave percentages must increase"
            raise ValueError(msg)
        if waves[-1] != 100.0:
            msg = "the last wave must reach 100 percent"
            raise ValueError(msg)
        return waves


class Phase(StrEnum):
    WAVE = "wave"
    PAUSED = "paused"
    COMPLETED = "completed"
    ROLLED_BACK = "rolled_back"
    REJECTED = "rejected"

    @property
    def final(self) -> bool:
        return self in {Phase.COMPLETED, Phase.ROLLED_BACK, Phase.REJECTED}


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
    """Members online now, or that already reported on this rollout."""
    updated: int = 0
    healthy: int = 0
    unhealthy: int = 0

    @property
    def reported(self) -> int:
        return self.healthy + self.unhealthy


class RolloutStatus(WireModel):
    id: str
    generation: int
    phase: Phase
    wave: int
    """Index of the current wave (0-based); equal to the number of waves when done."""
    waves_percent: tuple[float, ...]
    counts: WaveCounts
    classes: tuple[str, ...]
    release: str | None = None
    releases: dict[str, str] = Field(default_factory=dict)
    """Class -> the release id (name, variant, digest) its manifest names."""
    reason: str | None = Field(default=None, max_length=MAX_REASON_CHARS)
    cause: Cause | None = None
    """What ``reason`` says, for machines; None when there is no reason, or from a
    coordinator that did not send one."""
    updated_at: float
