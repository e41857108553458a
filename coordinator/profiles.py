"""Hardware class profiles: what each class of device can run and how to judge it.

Read from a TOML file at the entry point (``classes.toml`` beside this module is the
default). A candidate that does not fit a class is refused for that class before any
device sees it.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Final, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.precision import Precision
from schemas import HealthBudget, RolloutSpec, Runtime

__all__ = [
    "DEFAULT_PROFILES",
    "PRECISIONS",
    "AccuracyGate",
    "ClassProfile",
    "RolloutDefaults",
    "load_profiles",
    "rollout_policy",
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
    """What a rollout spec leaves unset (None) is taken from its classes' profiles.

    The waves are not among them: a spec always names its own."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    success_ratio: float = Field(default=1.0, gt=0.0, le=1.0)
    max_failure_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    wave_timeout_s: float = Field(default=900.0, gt=0.0, allow_inf_nan=False)


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
    health: HealthBudget
    rollout: RolloutDefaults = RolloutDefaults()
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
        return Runtime(providers=self.providers, intra_op_threads=self.intra_op_threads)


def rollout_policy(spec: RolloutSpec, profiles: Mapping[str, ClassProfile]) -> RolloutDefaults:
    """The ratios and timeout a rollout runs with: the spec's own where it sets them,
    else the strictest default of its (known) classes — the highest success ratio, the
    lowest failure ratio — and the longest wave timeout, so the class with the longest
    soak is not cut short (waiting only delays; it never promotes without evidence)."""
    defaults = [profiles[c].rollout for c in spec.classes if c in profiles] or [RolloutDefaults()]
    return RolloutDefaults(
        success_ratio=(
            spec.success_ratio
            if spec.success_ratio is not None
            else max(d.success_ratio for d in defaults)
        ),
        max_failure_ratio=(
            spec.max_failure_ratio
            if spec.max_failure_ratio is not None
            else min(d.max_failure_ratio for d in defaults)
        ),
        wave_timeout_s=(
            spec.wave_timeout_s
            if spec.wave_timeout_s is not None
            else max(d.wave_timeout_s for d in defaults)
        ),
    )


def load_profiles(path: Path = DEFAULT_PROFILES) -> dict[str, ClassProfile]:
    """Read ``[classes.<name>]`` tables.

    Raises:
        OSError, tomllib.TOMLDecodeError, pydantic.ValidationError: a bad file.
    """
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    classes = data.get("classes", {})
    return {name: ClassProfile(name=name, **table) for name, table in classes.items()}
