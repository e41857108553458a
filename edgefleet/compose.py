"""The composition root: how each party is built from a fleet home. The CLI, the demo and
the tests build coordinators, agents and rollouts through here, nowhere else."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from pathlib import Path

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
from schemas import Role, RolloutSpec

__all__ = ["coordinator_config", "make_agent", "read_variants", "start_rollout"]


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
    """An agent on its enrollment bundle, its input a stream of real held-out data
    (``SOURCES``)."""
    bundle = Bundle.load(bundle_dir)
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
    """Check a model's variants against the class profiles, then publish them and an
    operator-signed spec; nothing is published when a variant fits no class or a class
    no variant. Ratios and timeout left at None take the class profiles' defaults.

    Raises:
        RolloutExists: a rollout already holds ``rollout_id`` (checked before any upload).
        PolicyError: the variants do not fit the classes (see ``describe_candidate``).
    """
    await check_new_rollout(session, rollout_id)
    release, files = await asyncio.to_thread(read_variants, model, name)
    candidate = await asyncio.to_thread(describe_candidate, release, files, profiles, classes)
    await upload_candidate(session, candidate, files)
    spec = RolloutSpec(
        id=rollout_id,
        generation=1,
        classes=classes,
        candidate=candidate,
        waves_percent=waves,
        canaries=canaries,
        success_ratio=success_ratio,
        max_failure_ratio=max_failure_ratio,
        wave_timeout_s=wave_timeout_s,
        issued_at=time.time(),
        operator=OPERATOR,
    )
    await submit_spec(session, spec, home.key(Role.OPERATOR))
    return spec
