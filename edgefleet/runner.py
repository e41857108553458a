"""Composing parties in one process: a fleet of agents, a coordinator, an operator
session. Shared by the CLI, the demo and the tests."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnx

from agent import Agent, AgentConfig, Bundle, Feed
from broker.config import BrokerPorts
from broker.launcher import MosquittoBroker, free_ports
from broker.session import Session
from coordinator import Coordinator, CoordinatorConfig, load_profiles
from coordinator.operator import (
    VariantFile,
    check_new_rollout,
    describe_candidate,
    submit_spec,
    upload_candidate,
)
from coordinator.profiles import DEFAULT_PROFILES, ClassProfile
from edgefleet.home import COORDINATOR, OPERATOR, Home
from models import INPUT_NAME, DigitsStream
from models.datasets import load_cytology_split
from models.export import CYTOLOGY_INPUT_NAME
from models.optimize import read_bundle
from models.precision import detect_precision
from schemas import Role, RolloutSpec

__all__ = ["SOURCES", "Fleet", "cytology_source", "digits_source", "read_variants", "start_rollout"]


def digits_source(seed: int) -> Iterator[Feed]:
    """A device's camera: real held-out digits, in a device-specific order."""
    stream = DigitsStream(seed=seed)
    for sample in stream:
        yield {INPUT_NAME: np.asarray(sample, dtype=np.float32)}


def cytology_source(seed: int) -> Iterator[Feed]:
    """A cart's cytology analyser: real held-out fine-needle aspirate measurements, one
    sample at a time in a device-specific order."""
    x = load_cytology_split().x_holdout
    order = np.random.default_rng(seed).permutation(len(x))
    for index in itertools.cycle(order):
        yield {CYTOLOGY_INPUT_NAME: x[index : index + 1].copy()}


SOURCES: Final[dict[str, Callable[[int], Iterator[Feed]]]] = {
    "digits": digits_source,
    "cytology": cytology_source,
}
"""The simulated inputs a device can have, by name."""


class _Source:
    def __init__(self, frames: Iterator[Feed]) -> None:
        self._it = frames

    def __call__(self) -> Feed:
        return next(self._it)


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
    return Agent(bundle, bundle_dir, config, _Source(SOURCES[source](seed)))


@dataclass
class Fleet:
    """A home, a broker, a coordinator and agents, all in one process (for the demo
    and tests). Each agent has its own connection, identity and data folder."""

    workdir: Path
    classes: dict[str, int]
    agent_config: AgentConfig = field(default_factory=lambda: AgentConfig(data_dir=Path()))
    """Settings for every agent; each gets its own ``data_dir`` under ``workdir``."""
    profiles: Path | dict[str, ClassProfile] = DEFAULT_PROFILES
    """A class profiles file, or the profiles themselves."""
    sources: dict[str, str] = field(default_factory=dict)
    """Class -> the input its devices see (``SOURCES``); digits when not named."""
    datasets_dir: Path | None = None
    """The held-out data sets the classes' accuracy gates name."""
    home: Home = field(init=False)
    broker: MosquittoBroker = field(init=False)
    agents: dict[str, Agent] = field(default_factory=dict)
    agent_tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    coordinator: Coordinator | None = None
    coordinator_task: asyncio.Task[None] | None = None

    def setup(self) -> None:
        """Keys, enrollment and the broker (blocking)."""
        devices, services, websockets = free_ports(3)
        ports = BrokerPorts(devices=devices, services=services, websockets=websockets)
        self.home = Home.init(self.workdir / "home", ports=ports)
        for hw_class, count in self.classes.items():
            prefix = hw_class.split("-")[0]
            for i in range(count):
                self.home.enroll(f"{prefix}-{i:03d}", hw_class)
        self.broker = MosquittoBroker(
            folder=self.workdir / "broker", material=self.home.broker_material(), ports=ports
        )
        self.broker.start()

    def start_coordinator(self, tg: asyncio.TaskGroup, **changes: Any) -> Coordinator:
        """The coordinator on this fleet's home, with ``changes`` to its settings."""
        config = coordinator_config(
            self.home,
            self.workdir / "coordinator",
            self.profiles,
            datasets_dir=self.datasets_dir,
        )
        self.coordinator = Coordinator(replace(config, **changes))
        self.coordinator_task = tg.create_task(self.coordinator.run())
        return self.coordinator

    def start_agent(self, tg: asyncio.TaskGroup, device_id: str) -> Agent:
        agent = make_agent(
            self.home.root / "devices" / device_id,
            replace(self.agent_config, data_dir=self.workdir / "agents" / device_id),
            seed=sum(device_id.encode()),
            source=self.sources.get(self.home.devices()[device_id], "digits"),
        )
        self.agents[device_id] = agent
        self.agent_tasks[device_id] = tg.create_task(agent.run())
        return agent

    def class_profiles(self) -> dict[str, ClassProfile]:
        if isinstance(self.profiles, Path):
            return load_profiles(self.profiles)
        return dict(self.profiles)

    async def stop_agent(self, device_id: str) -> None:
        task = self.agent_tasks.pop(device_id)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    @contextlib.asynccontextmanager
    async def operator(self) -> AsyncIterator[Session]:
        async with Session(self.home.service_endpoint(OPERATOR), client_id="operator") as s:
            yield s

    def close(self) -> None:
        self.broker.stop()


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
    session: Session,
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
