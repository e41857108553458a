"""Hardware class profiles: what each class of device can run and how to judge it.

Read from a TOML file at the entry point (``classes.toml`` beside this module is the
default). A candidate that does not fit a class is refused for that class before any
device sees it.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Final, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from coordinator.drift import DriftPolicy
from coordinator.rollout import Policy
from models.precision import Precision
from schemas import HealthBudget, Release, RolloutSpec, Runtime, Variant

__all__ = [
    "DEFAULT_PROFILES",
    "PRECISIONS",
    "AccuracyGate",
    "ClassProfile",
    "RolloutDefaults",
    "class_policy",
    "load_profiles",
]

DEFAULT_PROFILES = Path(__file__).with_name("classes.toml")
PRECISIONS: Final[tuple[Precision, ...]] = get_args(Precision)


class AccuracyGate(BaseModel):
    """The coordinator's accuracy check of a candidate variant for a class, before any
    device of it sees the variant: ``models.gate.check_candidate`` on the named data
    set's held-out split, against the class's stable release (``edgefleet model
    validate`` is the same check)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dataset: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    """``<datasets_dir>/<dataset>.npz`` in the coordinator's configuration."""
    max_drop_points: float = Field(default=1.0, ge=0.0, le=100.0)
    min_accuracy: float | None = Field(default=None, ge=0.0, le=1.0)


class RolloutDefaults(BaseModel):
    """What a rollout spec leaves unset (None) is taken from each class's own profile:
    every class of a rollout is judged on its own. The waves are not among them: a spec
    always names its own."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    success_ratio: float = Field(default=1.0, gt=0.0, le=1.0)
    max_failure_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    wave_timeout_s: float = Field(default=900.0, gt=0.0, allow_inf_nan=False)
    min_soak_s: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)
    silence_s: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    """None: three times the release's soak plus a minute."""


class ClassProfile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str = ""
    providers: tuple[str, ...] = Field(min_length=1)
    precisions: tuple[Precision, ...] = Field(default=("fp32",), min_length=1)
    """What the class may run, most wanted first: of a rollout's variants, the class
    gets the first precision here that fits and passes the gate (the smaller on a tie)."""
    max_model_bytes: int = Field(gt=0)
    gate: AccuracyGate | None = None
    intra_op_threads: int = Field(default=1, ge=1, le=64)
    on_fallback: Literal["serve", "refuse"] = "serve"
    """When a model opens only on a later provider than the first: serve it degraded, or
    refuse it as a model that does not load (see ``agent.providers``)."""
    health: HealthBudget
    rollout: RolloutDefaults = RolloutDefaults()
    drift: DriftPolicy = DriftPolicy()
    """When the class's releases count as drifted from their reference (PSI threshold,
    inferences needed), judged on the fleet's aggregated telemetry."""
    manifest_ttl_s: float = Field(default=86_400.0, gt=0.0)

    @field_validator("precisions")
    @classmethod
    def _distinct(cls, precisions: tuple[Precision, ...]) -> tuple[Precision, ...]:
        if len(set(precisions)) != len(precisions):
            msg = f"precisions repeat: {precisions}"
            raise ValueError(msg)
        return precisions

    @property
    def runtime(self) -> Runtime:
        return Runtime(
            providers=self.providers,
            intra_op_threads=self.intra_op_threads,
            on_fallback=self.on_fallback,
        )

    def release(self, name: str, variant: Variant) -> Release:
        """``variant`` of model ``name`` as this class runs it: its runtime and health
        budget are the class's."""
        return Release(
            name=name,
            variant=variant.label,
            artifact=variant.artifact,
            golden=variant.golden,
            runtime=self.runtime,
            inputs=variant.inputs,
            outputs=variant.outputs,
            health=self.health,
        )


def class_policy(
    spec: RolloutSpec, profile: ClassProfile | None, health: HealthBudget | None
) -> Policy:
    """How one class's waves are judged where a wave leaves it unset: the spec's own
    values, else the class profile's defaults. Without a silence limit of its own, a
    device may take three soaks and a minute (to fetch, load and self-test) before it
    counts as silent."""
    defaults = RolloutDefaults() if profile is None else profile.rollout
    soak = 0.0 if health is None else health.soak_seconds
    silence = defaults.silence_s if defaults.silence_s is not None else 3 * soak + 60.0
    return Policy(
        success_ratio=_first(spec.success_ratio, defaults.success_ratio),
        max_failure_ratio=_first(spec.max_failure_ratio, defaults.max_failure_ratio),
        timeout_s=_first(spec.wave_timeout_s, defaults.wave_timeout_s),
        min_soak_s=_first(spec.min_soak_s, defaults.min_soak_s),
        silence_s=_first(spec.silence_s, silence),
    )


def _first(own: float | None, default: float) -> float:
    return default if own is None else own


def load_profiles(path: Path = DEFAULT_PROFILES) -> dict[str, ClassProfile]:
    """Read ``[classes.<name>]`` tables.

    Raises:
        OSError, tomllib.TOMLDecodeError, pydantic.ValidationError: a bad file.
    """
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    classes = data.get("classes", {})
    return {name: ClassProfile(name=name, **table) for name, table in classes.items()}
