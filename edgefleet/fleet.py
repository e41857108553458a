"""A whole fleet in one process: a home, a broker, a coordinator and agents, each agent
with its own connection, identity and data folder. The demo runs on it, and so do the
integration tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent import Agent, AgentConfig
from broker.config import BrokerPorts
from broker.launcher import MosquittoBroker, free_ports
from broker.session import Session
from coordinator import Coordinator, load_profiles
from coordinator.profiles import DEFAULT_PROFILES, ClassProfile
from edgefleet.compose import coordinator_config, make_agent
from edgefleet.home import OPERATOR, Home

__all__ = ["Fleet"]


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

    @contextlib.asynccontextmanager
    async def operator(self) -> AsyncIterator[Session]:
        async with Session(self.home.service_endpoint(OPERATOR), client_id="operator") as s:
            yield s

    def close(self) -> None:
        self.broker.stop()
