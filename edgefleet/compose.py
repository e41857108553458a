"""The composition root: how each party is built from a fleet home. The CLI, the demo and
the tests build coordinators, agents and rollouts through here, nowhere else."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final

import onnx

from agent import Agent, AgentConfig, Bundle
from broker.transport import Transport
from coordinator import CoordinatorConfig, load_profiles
from coordinator.operator import (
    VariantFile,
    check_new_rollout,
    describe_candidate,
    submit_spec,
    upload_candidate,
)
from coordinator.profiles import DEFAULT_PROFILES, ClassProfile
from edgefleet.home import COORDINATOR, OPERATOR, Home
from edgefleet.sources import SOURCES, Source
from models.optimize import read_bundle
from models.precision import detect_precision
from schemas import Candidate, MaintenanceWindow, Role, RolloutSpec, WaveSpec

__all__ = [
    "HOST_PROVIDERS",
    "SpecOptions",
    "coordinator_config",
    "make_agent",
    "prepare_candidate",
    "publish_rollout",
    "read_variants",
    "rollout_spec",
    "start_rollout",
]

HOST_PROVIDERS: Final = ("CPUExecutionProvider",)
"""What a simulated device runs its model on: the host's CPU."""


def coordinator_config(
    home: Home,
    data_dir: Path,
    profiles: Path | Mapping[str, ClassProfile] = DEFAULT_PROFILES,
    tick_s: float = 0.5,
    datasets_dir: Path | None = None,
) -> CoordinatorConfig:
    return CoordinatorConfig(
        datasets_dir=datasets_dir,
        data_dir=data_dir,
        endpoint=home.service_endpoint(COORDINATOR),
        profiles=load_profiles(profiles) if isinstance(profiles, Path) else dict(profiles),
        manifest_key=home.key(Role.MANIFEST),
        trust=home.trust(),
        root_keys=home.root_public_keys(),
        tick_s=tick_s,
    )


def make_agent(
    bundle_dir: Path, config: AgentConfig, *, seed: int, source: str = "digits"
) -> Agent:
    """A simulated device: an agent on its enrollment bundle, its input a stream of real
    held-out data (``SOURCES``). It runs on the host's CPU whatever accelerator its class
    names, unless ``config`` says otherwise (``providers``): not degraded for that."""
    bundle = Bundle.load(bundle_dir)
    config = replace(config, providers=config.providers or HOST_PROVIDERS)
    return Agent(bundle, bundle_dir, config, Source(SOURCES[source](seed)))


def read_variants(model: Path, name: str | None = None) -> tuple[str, list[VariantFile]]:
    """The release name and variant files of ``model``: a folder written by ``edgefleet
    model optimize`` (every variant with its golden vectors) or one ONNX file (one
    variant, labelled by its precision). Blocking.

    Raises:
        UsageError: a bundle folder that is missing files or does not match them.
        OSError: the file cannot be read.
        ValueError: the file is not an ONNX model.
    """
    if model.is_dir():
        bundle = read_bundle(model)
        files = [
            VariantFile(v.label, v.file.read_bytes(), v.golden.read_bytes())
            for v in bundle.variants
        ]
        return name or bundle.name, files
    data = model.read_bytes()
    try:
        label = detect_precision(onnx.load_from_string(data))
    except Exception as exc:  # onnx raises DecodeError and friends
        msg = f"{model} is not an ONNX model: {exc}"
        raise ValueError(msg) from exc
    return name or model.stem, [VariantFile(label, data)]


@dataclass(frozen=True, kw_only=True)
class SpecOptions:
    """Everything a rollout spec says besides its id, classes and model: the waves and
    how each is judged, canaries, pacing and maintenance windows. What is left at None
    takes the classes' profile defaults (see ``schemas.RolloutSpec``)."""

    waves: tuple[WaveSpec, ...] = (
        WaveSpec(percent=10.0),
        WaveSpec(percent=50.0),
        WaveSpec(percent=100.0),
    )
    canaries: tuple[str, ...] = ()
    success_ratio: float | None = None
    max_failure_ratio: float | None = None
    wave_timeout_s: float | None = None
    min_soak_s: float | None = None
    silence_s: float | None = None
    rate_per_min: int | None = None
    all_or_nothing: bool = False
    windows: Mapping[str, MaintenanceWindow] = field(default_factory=dict)


def rollout_spec(
    rollout_id: str,
    classes: Sequence[str],
    candidate: Candidate,
    options: SpecOptions,
    *,
    issued_at: float,
) -> RolloutSpec:
    """The first generation of a rollout's spec (pure; what ``rollout start`` signs and
    ``rollout plan`` plans).

    Raises:
        pydantic.ValidationError: the options break the spec's rules (waves that do not
            increase or end below 100 percent, a window for a class not rolled out, ...).
    """
    return RolloutSpec(
        id=rollout_id,
        generation=1,
        classes=tuple(classes),
        candidate=candidate,
        waves=options.waves,
        canaries=options.canaries,
        success_ratio=options.success_ratio,
        max_failure_ratio=options.max_failure_ratio,
        wave_timeout_s=options.wave_timeout_s,
        min_soak_s=options.min_soak_s,
        silence_s=options.silence_s,
        rate_per_min=options.rate_per_min,
        all_or_nothing=options.all_or_nothing,
        windows=dict(options.windows),
        issued_at=issued_at,
        operator=OPERATOR,
    )


def prepare_candidate(
    model: Path,
    name: str | None,
    profiles: Mapping[str, ClassProfile],
    classes: Sequence[str],
) -> tuple[Candidate, list[VariantFile]]:
    """The candidate a rollout of ``model`` to ``classes`` would name, and its files,
    checked as the coordinator will check them (blocking; see ``describe_candidate``).

    Raises:
        PolicyError, UsageError, OSError, ValueError: as ``read_variants`` and
            ``describe_candidate``.
    """
    release, files = read_variants(model, name)
    return describe_candidate(release, files, profiles, classes), files


async def publish_rollout(
    session: Transport,
    home: Home,
    model: Path,
    *,
    rollout_id: str,
    classes: tuple[str, ...],
    profiles: dict[str, ClassProfile],
    options: SpecOptions,
    name: str | None = None,
) -> RolloutSpec:
    """Check a model's variants against the class profiles, then publish them and an
    operator-signed spec; nothing is published when a variant fits no class, a class
    no variant, or the options make no valid spec.

    Raises:
        RolloutExists: a rollout already holds ``rollout_id`` (checked before any upload).
        PolicyError: the variants do not fit the classes (see ``describe_candidate``).
        pydantic.ValidationError: the options make no valid spec.
    """
    await check_new_rollout(session, rollout_id)
    candidate, files = await asyncio.to_thread(prepare_candidate, model, name, profiles, classes)
    spec = rollout_spec(rollout_id, classes, candidate, options, issued_at=time.time())
    await upload_candidate(session, candidate, files)
    await submit_spec(session, spec, home.key(Role.OPERATOR))
    return spec


async def start_rollout(
    session: Transport,
    home: Home,
    model: Path,
    *,
    rollout_id: str,
    classes: tuple[str, ...],
    waves: tuple[float, ...],
    profiles: dict[str, ClassProfile],
    name: str | None = None,
    canaries: tuple[str, ...] = (),
    success_ratio: float | None = None,
    max_failure_ratio: float | None = None,
    wave_timeout_s: float | None = None,
) -> RolloutSpec:
    """``publish_rollout`` with percent waves and the spec's other options at their
    defaults: the short form the demo and the tests use."""
    options = SpecOptions(
        waves=tuple(WaveSpec(percent=p) for p in waves),
        canaries=canaries,
        success_ratio=success_ratio,
        max_failure_ratio=max_failure_ratio,
        wave_timeout_s=wave_timeout_s,
    )
    return await publish_rollout(
        session,
        home,
        model,
        rollout_id=rollout_id,
        classes=classes,
        profiles=profiles,
        options=options,
        name=name,
    )
