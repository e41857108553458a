"""Execution providers on a real agent and real onnxruntime: a release whose class
prefers a provider this machine lacks serves on the CPU, degraded, saying why in the
device's state; a device pinned to its CPU is not degraded; a stored model that no
longer loads at a start leaves the device degraded, never silently idle."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnxruntime as ort

from agent import Agent, Bundle
from agent.store import AgentStore, PersistedState
from edgefleet.home import Home
from models import INPUT_NAME, DemoModel
from schemas import Mode, Release, Runtime
from tests.agent.conftest import release_of
from tests.agent.test_agent_serve import install
from tests.agent.test_agent_service import DEVICE, GUARD_S, config, stock
from tests.agent.test_agent_service import home as home  # noqa: PLC0414 (the fixture)

MISSING = next(p for p in ort.get_all_providers() if p not in ort.get_available_providers())


def _preferring_missing(model: DemoModel, **runtime: object) -> Release:
    release = release_of(model)
    wanted = Runtime(providers=(MISSING, "CPUExecutionProvider"), **runtime)
    return release.model_copy(update={"runtime": wanted})


def _agent(home: Home, data: Path, **changes: object) -> Agent:
    bundle_dir = home.root / "devices" / DEVICE
    return Agent(Bundle.load(bundle_dir), bundle_dir, config(data, **changes))


def test_a_release_preferring_a_missing_provider_serves_degraded_on_the_cpu(
    home: Home, tmp_path: Path, demo_models: dict[str, DemoModel]
) -> None:
    model = demo_models["digits-v1"]
    stock(tmp_path, model)
    release = _preferring_missing(model)

    async def scenario() -> None:
        agent = _agent(home, tmp_path)
        async with asyncio.timeout(GUARD_S), agent:
            await install(agent, home, release)
            state = agent.state()
            assert (state.mode, state.active_release) == (Mode.DEGRADED, release.release_id)
            assert state.degraded_reason is not None
            assert state.degraded_reason.startswith(f"provider: {MISSING}: not in this")
            assert state.degraded_reason.endswith("serving on CPUExecutionProvider")
            answer = await agent.infer({INPUT_NAME: np.zeros((1, 64), dtype=np.float32)})
            assert answer.release_id == release.release_id, "degraded, yet it answers"

    asyncio.run(scenario())


def test_a_device_pinned_to_its_cpu_is_not_degraded(
    home: Home, tmp_path: Path, demo_models: dict[str, DemoModel]
) -> None:
    model = demo_models["digits-v1"]
    stock(tmp_path, model)

    async def scenario() -> None:
        agent = _agent(home, tmp_path, providers=("CPUExecutionProvider",))
        async with asyncio.timeout(GUARD_S), agent:
            await install(agent, home, _preferring_missing(model))
            state = agent.state()
            assert (state.mode, state.degraded_reason) == (Mode.SERVING, None)

    asyncio.run(scenario())


def test_a_stored_model_that_no_longer_loads_leaves_the_device_degraded_at_its_start(
    home: Home, tmp_path: Path, demo_models: dict[str, DemoModel]
) -> None:
    """It served pinned to its CPU; restarted without the pin, its release (which
    refuses a fallback) opens only on the CPU: it does not load."""
    model = demo_models["digits-v1"]
    stock(tmp_path, model)
    release = _preferring_missing(model, on_fallback="refuse")
    AgentStore(tmp_path / "state.json").save(PersistedState(active=release))

    async def start(**changes: object) -> tuple[Mode, str | None, bool]:
        agent = _agent(home, tmp_path, **changes)
        async with asyncio.timeout(GUARD_S), agent:
            await agent.ready.wait()
            state = agent.state()
            return state.mode, state.degraded_reason, agent.active_release is not None

    pinned = asyncio.run(start(providers=("CPUExecutionProvider",)))
    assert pinned == (Mode.SERVING, None, True)
    mode, reason, serving = asyncio.run(start())
    assert (mode, serving) == (Mode.DEGRADED, False)
    assert reason is not None
    assert reason.startswith(f"model: {release.release_id} does not load: ")
    assert "refuses a fallback" in reason
