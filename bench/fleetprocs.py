"""The processes of ``bench.fleet``: simulated devices, the raw fan-out baseline on the
same identities, and the bare paho subscriber that the coordinator's ingest is held to.
Each is a ``multiprocessing`` target talking to the bench over a pipe."""

from __future__ import annotations

import asyncio
import logging
import resource
import threading
import time
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PublicKey,
)
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.bundle import Bundle
from broker.session import Endpoint, Session
from edgefleet.sim import Observer, SimConfig, Simulator
from schemas import (
    topics,
)
from schemas.topics import DeviceChannel

HW_CLASS: Final = "sim-camera"
SOAK_S: Final = 1.0
BARE: Final = "bench-bare"
FANOUT_ROUNDS: Final = 3


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Reporter(Observer):
    """Tells the parent when every device of this worker verified a manifest."""

    def __init__(self, conn: Connection, devices: int) -> None:
        self._conn = conn
        self._devices = devices
        self._took: Counter[int] = Counter()
        self._first: dict[int, float] = {}

    def verified(self, device_id: str, seq: int) -> None:  # noqa: ARG002 (an Observer hook)
        now = time.monotonic()
        self._first.setdefault(seq, now)
        self._took[seq] += 1
        if self._took[seq] == self._devices:
            self._conn.send(("verified", seq, self._first[seq], now))


async def _commands(conn: Connection) -> asyncio.Queue[tuple[Any, ...]]:
    queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
    asyncio.get_running_loop().add_reader(conn.fileno(), lambda: queue.put_nowait(conn.recv()))
    return queue


async def _devices_main(conn: Connection, folders: list[Path]) -> None:
    sim = Simulator(folders, SimConfig(soak_s=SOAK_S), observer=Reporter(conn, len(folders)))
    commands = await _commands(conn)
    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(sim.run())
        await sim.until_connected()
        conn.send(("up", len(folders)))
        while True:
            command, arg = await commands.get()
            if command == "hold":
                sim.gate.close()
                conn.send(("holding", 0))
            elif command == "until_held":
                await sim.gate.until_held(arg)
                conn.send(("held", arg))
            elif command == "open":
                sim.gate.open()
            elif command == "quiet":
                await sim.until_quiet()
                conn.send(("quiet", arg))
            else:
                runner.cancel()
                return


def devices_worker(conn: Connection, folders: list[Path]) -> None:
    raise_fd_limit()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(_devices_main(conn, folders))


async def _fanout_main(conn: Connection, folders: list[Path], key: bytes) -> None:
    """Bare subscribers on the devices' identities: receive, verify, nothing else; one
    report per round once every subscriber of this worker verified that round's payload."""
    public = Ed25519PublicKey.from_public_bytes(key)
    commands = await _commands(conn)
    topic = topics.class_manifest(HW_CLASS)
    done: list[list[float]] = [[] for _ in range(FANOUT_ROUNDS)]
    stop = asyncio.Event()

    async def subscriber(folder: Path, ready: asyncio.Event) -> None:
        bundle = Bundle.load(folder)
        endpoint = Endpoint(
            host=bundle.broker_host,
            port=bundle.broker_port,
            ca_file=folder / bundle.ca_file,
            cert_file=folder / bundle.cert_file,
            key_file=folder / bundle.key_file,
        )
        async with Session(endpoint, client_id=folder.name, keepalive=60, connect_timeout=60) as s:
            messages = aiter(s.messages())
            await s.subscribe(topic)
            ready.set()
            rounds = 0
            async for message in messages:
                if message.retain:  # the retained one came on subscribing
                    continue
                public.verify(message.payload[:64], message.payload[64:])
                took = done[rounds]
                took.append(time.monotonic())
                if len(took) == len(folders):
                    conn.send(("fanned", rounds, min(took), max(took)))
                rounds += 1
                if rounds == FANOUT_ROUNDS:
                    break
            await stop.wait()

    readies = [asyncio.Event() for _ in folders]
    async with asyncio.TaskGroup() as tg:
        for folder, ready in zip(folders, readies, strict=True):
            tg.create_task(subscriber(folder, ready))
        for ready in readies:
            await ready.wait()
        conn.send(("up", len(folders)))
        await commands.get()
        stop.set()


def fanout_worker(conn: Connection, folders: list[Path], key: bytes) -> None:
    raise_fd_limit()
    asyncio.run(_fanout_main(conn, folders, key))


def bare_worker(conn: Connection, endpoint: Endpoint) -> None:
    """A bare paho subscriber on every device's health and telemetry: once armed with a
    count, it says when that many messages have arrived. Nothing is decoded."""
    armed = threading.Event()
    subscribed = threading.Event()
    lock = threading.Lock()
    seen = [0, 0]  # received since armed, expected

    def on_connect(client: mqtt.Client, *_: Any) -> None:
        client.subscribe(
            [
                (topics.all_devices(DeviceChannel.HEALTH), 1),
                (topics.all_devices(DeviceChannel.TELEMETRY), 1),
            ]
        )

    def on_message(_client: mqtt.Client, _userdata: Any, _message: mqtt.MQTTMessage) -> None:
        if not armed.is_set():
            return
        with lock:
            seen[0] += 1
            if seen[0] == seen[1]:
                conn.send(("bare", time.monotonic(), seen[0]))

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=BARE, protocol=MQTTProtocolVersion.MQTTv5
    )
    client.tls_set(ca_certs=str(endpoint.ca_file))
    client.username_pw_set(endpoint.username, endpoint.password)
    client.on_connect = on_connect
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_message = on_message
    client.connect(endpoint.host, endpoint.port, keepalive=60)
    client.loop_start()
    subscribed.wait(60)
    conn.send(("up", 1))
    while (command := conn.recv())[0] == "arm":
        with lock:
            seen[:] = [0, command[1]]
        armed.set()
        conn.send(("armed", command[1]))
    client.loop_stop()
    client.disconnect()


# -- this process ----------------------------------------------------------------------
