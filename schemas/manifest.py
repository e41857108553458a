"""Per-hardware-class manifests: what each device of a class should run.

One retained, signed manifest per class carries every wave of a rollout:
``stable`` is what everyone runs; ``rollout`` names a candidate for the canaries and
for devices whose stable bucket is below ``cutoff_bp``. Raising ``cutoff_bp`` is the
next wave, clearing ``rollout`` is a rollback, moving the candidate into ``stable``
is the promotion.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Annotated, Final, Literal

from pydantic import Field

from schemas.artifact import SHA256_PATTERN
from schemas.codec import WireModel
from schemas.topics import NAME_PATTERN

__all__ = [
    "BUCKETS",
    "MANIFEST_KIND",
    "MAX_SEQ",
    "ArtifactRef",
    "HealthBudget",
    "Manifest",
    "Release",
    "RolloutCohort",
    "Runtime",
    "Target",
    "TensorSpec",
    "bucket",
    "dtype_name",
]

MANIFEST_KIND: Final = "manifest"
MAX_SEQ: Final = 2**53 - 1
"""The highest manifest seq: exact in every JSON and JavaScript reader, and far from the
msgpack limit, so ``seq + 1`` always encodes (a signed seq of 2**64-1 would leave its
class no seq to continue with)."""
BUCKETS: Final = 10_000


class ArtifactRef(WireModel):
    sha256: str = Field(pattern=SHA256_PATTERN)
    size: int = Field(ge=1)


class Runtime(WireModel):
    engine: Literal["onnxruntime"] = "onnxruntime"
    providers: tuple[str, ...] = Field(min_length=1, max_length=8)
    """Execution providers in order of preference: the agent tries them in turn (CPU
    last even when left out); serving on any but the first makes the device degraded."""
    intra_op_threads: int = Field(default=1, ge=1, le=64)
    on_fallback: Literal["serve", "refuse"] = "serve"
    """When the model opens only on a later provider than the first: ``serve`` it
    (degraded, the reason in the device's state), or ``refuse`` it as a model that does
    not load (the device keeps the model it serves)."""


_ORT_DTYPES: Final = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(bool)": "bool",
}


def dtype_name(onnx_type: str) -> str:
    """The wire name of a tensor type as onnxruntime spells it (``tensor(float)``)."""
    return _ORT_DTYPES.get(onnx_type, onnx_type)


class TensorSpec(WireModel):
    name: str = Field(min_length=1, max_length=128)
    dtype: str = Field(max_length=32)
    shape: tuple[int | str | None, ...]


class HealthBudget(WireModel):
    max_error_rate: float = Field(ge=0.0, le=1.0)
    p95_latency_ms: float = Field(gt=0.0)
    min_inferences: int = Field(ge=1)
    soak_seconds: float = Field(ge=0.0)


class Release(WireModel):
    name: str = Field(pattern=NAME_PATTERN)
    variant: str | None = Field(default=None, pattern=NAME_PATTERN)
    """Which build of the model this class runs (``fp32``, ``int8-static``, ...)."""
    artifact: ArtifactRef
    golden: ArtifactRef | None = None
    """Self-test vectors for this very artifact (a ``GoldenSet``), fetched beside it."""
    runtime: Runtime
    inputs: tuple[TensorSpec, ...] = Field(min_length=1)
    outputs: tuple[TensorSpec, ...] = Field(min_length=1)
    health: HealthBudget

    @property
    def release_id(self) -> str:
        """Short, unique name of a release: its name, variant and the start of its digest."""
        variant = f":{self.variant}" if self.variant else ""
        return f"{self.name}{variant}@{self.artifact.sha256[:12]}"


class RolloutCohort(WireModel):
    id: str = Field(pattern=NAME_PATTERN)
    candidate: Release
    salt: str = Field(min_length=1, max_length=64)
    cutoff_bp: int = Field(ge=0, le=BUCKETS)
    canaries: tuple[Annotated[str, Field(pattern=NAME_PATTERN)], ...] = Field(
        default=(), max_length=1000
    )


class Manifest(WireModel):
    hw_class: str = Field(pattern=NAME_PATTERN)
    seq: int = Field(ge=1, le=MAX_SEQ)
    issued_at: float
    expires_at: float
    stable: Release | None
    rollout: RolloutCohort | None = None

    def target_for(self, device_id: str) -> Target:
        """Which release ``device_id`` should run under this manifest."""
        cohort = self.rollout
        if cohort is not None and (
            device_id in cohort.canaries or bucket(cohort.salt, device_id) < cohort.cutoff_bp
        ):
            return Target(release=cohort.candidate, rollout_id=cohort.id)
        return Target(release=self.stable, rollout_id=None)


@dataclass(frozen=True)
class Target:
    """What one device should run under a manifest (not a wire message)."""

    release: Release | None
    rollout_id: str | None


def bucket(salt: str, device_id: str) -> int:
    """A device's stable bucket in ``0..BUCKETS-1`` for a rollout's salt."""
    digest = hashlib.sha256(f"{salt}\0{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS
