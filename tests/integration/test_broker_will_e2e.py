"""A process that dies leaves its Last Will: real ``edgefleet agent run`` and
``edgefleet coordinator run`` processes killed with SIGKILL read ``offline`` on their
retained presence, as a newcomer sees it. The coordinator is started from another
folder: its store still lands under the fleet home."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from broker.session import Session
from edgefleet.fleet import Fleet
from schemas import topics
from schemas.topics import DeviceChannel
from tests.integration.fleetkit import JETSON, WIRE_ACCOUNTS, MakeFleet, run

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0
"""A hang guard: the process imports onnxruntime and connects within seconds."""


def _spawn(fleet: Fleet, *args: str, cwd: Path = REPO) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "edgefleet.cli", "--home", str(fleet.home.root), *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def _presence_after_kill(fleet: Fleet, proc: subprocess.Popen[bytes], topic: str) -> bytes:
    """Wait for ``online`` on ``topic``, SIGKILL ``proc``, and return the retained value a
    new reader then gets once it is no longer ``online``."""
    account = WIRE_ACCOUNTS[0]
    async with Session(fleet.home.service_endpoint(account), client_id=account) as reader:
        await reader.subscribe(topic)
        incoming = reader.messages()
        async with asyncio.timeout(START_TIMEOUT_S):
            async for message in incoming:
                if message.payload == b"online":
                    break
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait)
        async with asyncio.timeout(10):
            async for message in incoming:
                if message.payload != b"online":
                    break
    # Retained, not only delivered live: a newcomer reads it too.
    async with Session(fleet.home.service_endpoint(account), client_id=account) as newcomer:
        await newcomer.subscribe(topic)
        async with asyncio.timeout(10):
            message = await anext(newcomer.messages())
    assert message.retain
    return message.payload


def test_agent_killed_with_sigkill_leaves_presence_offline(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({JETSON: 1})
    (device_id,) = fleet.home.devices()
    bundle = fleet.home.root / "devices" / device_id
    proc = _spawn(
        fleet, "agent", "run", "--bundle", str(bundle), "--data", str(fleet.workdir / "a")
    )
    try:
        topic = topics.device(device_id, DeviceChannel.PRESENCE)
        assert run(_presence_after_kill(fleet, proc, topic)) == b"offline"
    finally:
        proc.kill()
        proc.wait()


def test_coordinator_killed_with_sigkill_leaves_presence_offline(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({JETSON: 1})
    profiles = fleet.workdir / "profiles.toml"
    elsewhere = fleet.workdir / "elsewhere"
    elsewhere.mkdir()
    proc = _spawn(fleet, "coordinator", "run", "--classes", str(profiles), cwd=elsewhere)
    try:
        assert run(_presence_after_kill(fleet, proc, topics.coordinator_presence())) == b"offline"
    finally:
        proc.kill()
        proc.wait()
    # The default store is the home's, whatever the working directory.
    assert (fleet.home.root / "coordinator-data").is_dir()
    assert list(elsewhere.iterdir()) == []
