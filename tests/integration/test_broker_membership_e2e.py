"""Fleet membership on a live broker: ``edgefleet broker up`` runs Mosquitto from the
home, ``device enroll`` lets a new device in without a restart, and ``device revoke``
refuses its certificate, ends its connection and clears its retained topics while every
other device stays connected."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import Bundle
from broker.config import BrokerPorts
from broker.launcher import free_ports, running_pid, which_mosquitto
from broker.session import (
    ConnectRefused,
    Endpoint,
    Message,
    PublishRefused,
    Session,
    TransportError,
    Will,
)
from edgefleet.cli import main
from edgefleet.home import WATCHER, Home
from schemas import topics
from schemas.topics import DeviceChannel
from tests.integration.fleetkit import JETSON, run

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def home_with_broker() -> Iterator[Home]:
    """A fresh home on free ports, its broker started by ``edgefleet broker up``."""
    which_mosquitto()
    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-membership-"))
    workdir.chmod(0o755)  # Mosquitto drops to its own user when started as root
    devices, services, websockets = free_ports(3)
    ports = BrokerPorts(devices=devices, services=services, websockets=websockets)
    home = Home.init(workdir / "home", ports=ports)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgefleet.cli", "--home", str(home.root), "broker", "up"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "mosquitto up" in line, line
        assert running_pid(home.broker_folder) is not None
        yield home
    finally:
        proc.terminate()
        proc.wait(15)
        if proc.stdout is not None:
            proc.stdout.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _cli(home: Home, *args: str) -> int:
    return main(["--home", str(home.root), *args])


def _device_endpoint(home: Home, device_id: str) -> Endpoint:
    folder = home.root / "devices" / device_id
    bundle = Bundle.load(folder)
    return Endpoint(
        host=bundle.broker_host,
        port=bundle.broker_port,
        ca_file=folder / bundle.ca_file,
        cert_file=folder / bundle.cert_file,
        key_file=folder / bundle.key_file,
    )


async def _publish_once_allowed(session: Session, topic: str, payload: bytes) -> None:
    """Publish retained; the broker's reload after enrollment is asynchronous (SIGHUP)."""
    async with asyncio.timeout(10):
        while True:
            try:
                await session.publish(topic, payload, retain=True)
                return
            except PublishRefused:
                await asyncio.sleep(0.1)


async def _retained(home: Home) -> dict[str, bytes]:
    """Every retained device topic, as a newcomer reads it."""
    async with Session(home.service_endpoint(WATCHER), client_id=WATCHER) as watcher:
        await watcher.subscribe(*(topics.all_devices(c) for c in DeviceChannel))
        # The broker sends a subscription's retained messages before it answers the next
        # SUBSCRIBE on the same connection: once this SUBACK is in, they all are.
        await watcher.subscribe(topics.coordinator_presence())
        got: list[Message] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.3):  # drains what is already queued
                async for message in watcher.messages():
                    got.append(message)
        return {m.topic: m.payload for m in got if m.retain and m.payload}


def test_enroll_and_revoke_take_effect_on_the_running_broker(
    home_with_broker: Home, capsys: pytest.CaptureFixture[str]
) -> None:
    home = home_with_broker
    assert _cli(home, "device", "enroll", "cam-1", "--class", JETSON) == 0
    assert _cli(home, "device", "enroll", "cam-2", "--class", JETSON) == 0
    assert "the running broker reloaded" in capsys.readouterr().err

    cam1_state = topics.device("cam-1", DeviceChannel.STATE)
    cam1_presence = topics.device("cam-1", DeviceChannel.PRESENCE)
    cam2_state = topics.device("cam-2", DeviceChannel.STATE)

    async def scenario() -> dict[str, bytes]:
        will = Will(topic=cam1_presence, payload=b"offline")
        async with (
            Session(_device_endpoint(home, "cam-1"), client_id="cam-1", will=will) as cam1,
            Session(_device_endpoint(home, "cam-2"), client_id="cam-2") as cam2,
        ):
            # Enrolled after the broker started, yet both may publish: no restart needed.
            await _publish_once_allowed(cam1, cam1_presence, b"online")
            await _publish_once_allowed(cam1, cam1_state, b"cam-1 state")
            await _publish_once_allowed(cam2, cam2_state, b"cam-2 state")
            assert (await _retained(home))[cam1_state] == b"cam-1 state"

            assert await asyncio.to_thread(_cli, home, "device", "revoke", "cam-1") == 0

            # Its live connection was ended and cannot come back: the CRL refuses it.
            assert not cam1.connected or cam1.generation > 1
            with pytest.raises(TransportError):
                async with Session(
                    _device_endpoint(home, "cam-1"), client_id="cam-1", connect_timeout=3
                ):
                    pass
            # Everyone else kept their connection and their rights.
            assert cam2.connected
            assert cam2.generation == 1
            await cam2.publish(cam2_state, b"cam-2 still here", retain=True)
            return await _retained(home)

    retained = run(scenario())
    # Its retained topics are gone (the Will's "offline" too), the others' stay.
    assert [t for t in retained if "/devices/cam-1/" in t] == []
    assert retained[cam2_state] == b"cam-2 still here"

    out = capsys.readouterr().out
    assert "revoked cam-1" in out
    assert "cam-1: disconnected, retained topics cleared" in out
    assert _cli(home, "device", "list") == 0
    assert capsys.readouterr().out.splitlines() == [
        f"cam-1\t{JETSON}\trevoked",
        f"cam-2\t{JETSON}\tenrolled",
    ]
    # A revoked id is not handed out again; revoking again only clears again.
    assert _cli(home, "device", "enroll", "cam-1", "--class", JETSON) == 2
    assert _cli(home, "device", "revoke", "cam-1") == 0
    assert _cli(home, "device", "revoke", "cam-404") == 2
    assert "no enrolled device 'cam-404'" in capsys.readouterr().err

    # An account added while the broker runs may log in at once, with its role's rights.
    assert _cli(home, "account", "add", "ci-operator", "--role", "operator") == 0
    assert "the running broker reloaded" in capsys.readouterr().out
    run(_staging_only(home, "ci-operator"))


async def _staging_only(home: Home, account: str) -> None:
    sha = "ab" * 32
    async with asyncio.timeout(10):
        while True:
            try:
                async with Session(home.service_endpoint(account), client_id=account) as op:
                    await op.publish(topics.staging_meta(sha), b"staged", retain=True)
                    with pytest.raises(PublishRefused):
                        await op.publish(topics.artifact_meta(sha), b"forged", retain=True)
                return
            except ConnectRefused:  # the reload is asynchronous
                await asyncio.sleep(0.1)


def test_enroll_refuses_a_class_no_profile_defines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = str(tmp_path / "home")
    assert main(["--home", home, "keys", "init"]) == 0
    assert main(["--home", home, "device", "enroll", "cam-1", "--class", "toaster-class"]) == 2
    err = capsys.readouterr().err
    assert "no profile defines class 'toaster-class'" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "home" / "devices" / "cam-1").exists()
    assert main(["--home", home, "device", "list"]) == 0
    assert capsys.readouterr().out == ""
