"""A rollout to ``--devices`` simulated devices against the real Mosquitto and the real
coordinator, measured from the wire, with its baselines in the same run.

Parts, all real: Mosquitto from the repo's ``mosquitto.conf`` (its descriptor limit
raised); the coordinator as ``edgefleet coordinator run`` in its own process; the
devices are :mod:`edgefleet.sim` devices (own mTLS identity and session, Last Will,
manifests verified by the agent's ``Intake`` with Ed25519, presence, state, health and
telemetry with the real schemas) in ``--processes`` worker processes; the rollout is
started by the operator's path (``edgefleet.compose.start_rollout``: the demo model
``digits-v1`` uploaded to staging, a signed spec, ``waves_percent`` 10 and 100, success
ratio 1). The simulated devices fetch and run no model (protocol level); they publish
their state on changes after the agent's settle, and no telemetry or liveness state
besides (a quiet fleet: what is measured is the rollout's own traffic).

Two probe devices run in this process, one in each wave, their reports held back; the
rest of each wave reports first. Each manifest goes out to a quiet fleet: before the
rollout starts and before a probe reports, every device's changed state is published (a
real wave soaks for minutes; this one soaks for a second). Figures:

* decision latency per wave: from the probe's health report (just before its publish) to
  the next manifest received by a watcher subscribed to the class manifest. The probe is
  the last report the wave needs (success ratio 1);
* ingest: the second wave's reports (telemetry summary, then health, per device) are held
  until every device has one, then released at once. The coordinator is done when its
  retained status counts them all healthy; a bare paho subscriber (own process, on
  ``devices/+/health`` and ``devices/+/telemetry``) is done when it has them all. Ratio of
  their rates (>= 0.5 is the goal);
* convergence of each manifest: from the watcher's receipt to the last device having
  verified it, against the baseline: the coordinator stopped, the same devices' identities
  on bare sessions (the same ``Session`` and process layout as the devices) subscribed to
  the class manifest, a same-size payload published there (retained) by an admin account,
  each subscriber verifying an Ed25519 signature on it; from the admin's own receipt to the
  last verification, in as many rounds as the rollout has manifests. The goal compares
  like with like, the worst manifest with the worst round (<= 1.5x); the ratio of the
  medians is given beside it;
* the coordinator's RSS (and peak) from ``/proc`` once the rollout completed.

Human-readable lines come first; the last line is one JSON object with every figure.

Run from the repository root: ``.venv/bin/python -m bench.fleet [--devices N]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.bundle import Bundle
from broker.config import BrokerPorts
from broker.launcher import MosquittoBroker, free_ports
from broker.session import Endpoint, Message, Session
from coordinator import load_profiles
from edgefleet.compose import start_rollout
from edgefleet.home import OPERATOR, WATCHER, Home
from edgefleet.sim import Observer, SimConfig, Simulator
from edgefleet.simcli import enroll_sim_devices
from models import build_demo_models
from schemas import (
    HealthReport,
    Manifest,
    Phase,
    RolloutStatus,
    bucket,
    decode,
    topics,
)
from schemas.envelope import Envelope
from schemas.manifest import BUCKETS
from schemas.topics import DeviceChannel

HW_CLASS: Final = "sim-camera"
ROLLOUT: Final = "bench-rollout"
WAVES: Final = (10.0, 100.0)
SOAK_S: Final = 1.0
ADMIN: Final = "bench-admin"
BARE: Final = "bench-bare"
PROFILES: Final = f"""
[classes.{HW_CLASS}]
providers = ["CPUExecutionProvider"]
max_model_bytes = 20_000_000
health = {{ max_error_rate = 0.01, p95_latency_ms = 10.0, min_inferences = 20, \
soak_seconds = {SOAK_S} }}
rollout = {{ success_ratio = 1.0, max_failure_ratio = 0.0, wave_timeout_s = 1800 }}
"""
FANOUT_ROUNDS: Final = 3
"""Baseline fan-outs: as many as the rollout's manifests (two waves, the promotion)."""
_STEP_TIMEOUT_S: Final = 900.0
"""A guard against a hang at any one step; a step at 10,000 devices takes seconds."""


def _say(line: str) -> None:
    print(line, flush=True)


def _of_round(round_: int, report: tuple[Any, ...]) -> bool:
    return bool(report[1] == round_)


def _raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _status_kb(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1])
    return 0


# -- worker processes ------------------------------------------------------------------


class _Reporter(Observer):
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
    sim = Simulator(folders, SimConfig(soak_s=SOAK_S), observer=_Reporter(conn, len(folders)))
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


def _devices_worker(conn: Connection, folders: list[Path]) -> None:
    _raise_fd_limit()
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


def _fanout_worker(conn: Connection, folders: list[Path], key: bytes) -> None:
    _raise_fd_limit()
    asyncio.run(_fanout_main(conn, folders, key))


def _bare_worker(conn: Connection, endpoint: Endpoint) -> None:
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


class _Pipes:
    """The parent's end of some worker processes: commands out, reports in."""

    def __init__(self, conns: list[Connection]) -> None:
        self.conns = conns
        self._got: list[tuple[Any, ...]] = []
        self._changed = asyncio.Event()
        loop = asyncio.get_running_loop()
        for conn in conns:
            loop.add_reader(conn.fileno(), self._read, conn)

    def _read(self, conn: Connection) -> None:
        try:
            self._got.append(conn.recv())
        except EOFError:
            asyncio.get_running_loop().remove_reader(conn.fileno())
        self._changed.set()

    def send(self, *command: Any) -> None:
        for conn in self.conns:
            conn.send(command)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for conn in self.conns:
            loop.remove_reader(conn.fileno())

    async def gather(
        self, kind: str, n: int | None = None, match: Callable[[tuple[Any, ...]], bool] = bool
    ) -> list[tuple[Any, ...]]:
        """The first ``n`` (default: one per worker) reports of ``kind`` that ``match``."""
        wanted = len(self.conns) if n is None else n
        async with asyncio.timeout(_STEP_TIMEOUT_S):
            while True:
                found = [m for m in self._got if m[0] == kind and match(m)]
                if len(found) >= wanted:
                    return found[:wanted]
                self._changed.clear()
                await self._changed.wait()


@dataclass
class _Seen:
    """A manifest as the watcher received it."""

    at: float
    seq: int
    cutoff_bp: int | None
    size: int


@dataclass
class _Watch:
    """The class manifest and the rollout's status, as a dashboard receives them."""

    manifests: list[_Seen] = field(default_factory=list)
    status: RolloutStatus | None = None
    status_at: float = 0.0
    coordinator_online: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def follow(self, session: Session) -> None:
        async for message in session.messages():
            self._note(message, time.monotonic())
            self.changed.set()

    def _note(self, message: Message, at: float) -> None:
        if not message.payload:
            return
        if message.topic == topics.coordinator_presence():
            self.coordinator_online = message.payload == b"online"
        elif message.topic == topics.rollout_status(ROLLOUT):
            self.status, self.status_at = decode(message.payload, RolloutStatus), at
        elif message.topic == topics.class_manifest(HW_CLASS):
            doc = decode(decode(message.payload, Envelope).body, Manifest)
            if not self.manifests or doc.seq > self.manifests[-1].seq:
                cutoff = None if doc.rollout is None else doc.rollout.cutoff_bp
                self.manifests.append(_Seen(at, doc.seq, cutoff, len(message.payload)))

    async def until(self, ready: Callable[[], Any]) -> Any:
        async with asyncio.timeout(_STEP_TIMEOUT_S):
            while not (found := ready()):
                self.changed.clear()
                await self.changed.wait()
            return found

    async def manifest(self, match: Callable[[_Seen], bool]) -> _Seen:
        seen: _Seen = await self.until(lambda: next(filter(match, self.manifests), None))
        return seen

    async def status_when(self, match: Callable[[RolloutStatus], bool]) -> float:
        """When the first status that matches arrived."""
        at: float = await self.until(
            lambda: self.status is not None and match(self.status) and self.status_at
        )
        return at


class _Probe(Observer):
    """A device of this process whose health report waits for a word from the bench."""

    def __init__(self, folder: Path) -> None:
        self.verified_at: dict[int, float] = {}
        self.changed = asyncio.Event()
        self.reported = asyncio.get_running_loop().create_future()
        self.sim = Simulator([folder], SimConfig(soak_s=SOAK_S), observer=self)
        self.sim.gate.close()

    def verified(self, device_id: str, seq: int) -> None:  # noqa: ARG002 (an Observer hook)
        self.verified_at[seq] = time.monotonic()
        self.changed.set()

    async def took(self, seq: int) -> float:
        """When it verified the manifest of ``seq``."""
        async with asyncio.timeout(_STEP_TIMEOUT_S):
            while seq not in self.verified_at:
                self.changed.clear()
                await self.changed.wait()
        return self.verified_at[seq]

    def reporting(self, device_id: str, report: HealthReport) -> None:  # noqa: ARG002 (an Observer hook)
        if not self.reported.done():
            self.reported.set_result(time.monotonic())

    async def report(self) -> float:
        """Let its report go; when it was about to be published."""
        self.sim.gate.open()
        async with asyncio.timeout(_STEP_TIMEOUT_S):
            at: float = await self.reported
        return at


@dataclass
class _Fleet:
    """What the bench set up: the home, the broker, the model, the device folders."""

    workdir: Path
    home: Home
    broker: MosquittoBroker
    profiles: Path
    model: Path
    folders: list[Path]
    processes: int

    def in_wave_one(self, folder: Path) -> bool:
        return bucket(ROLLOUT, folder.name) < WAVES[0] * BUCKETS / 100

    def probes(self) -> tuple[Path, Path]:
        first = next(f for f in self.folders if self.in_wave_one(f))
        second = next(f for f in self.folders if not self.in_wave_one(f))
        return first, second

    def slices(self, folders: list[Path]) -> list[list[Path]]:
        return [folders[i :: self.processes] for i in range(self.processes)]


def _setup(workdir: Path, n: int, processes: int) -> _Fleet:
    devices, services, websockets = free_ports(3)
    ports = BrokerPorts(devices=devices, services=services, websockets=websockets)
    home = Home.init(workdir / "home", ports=ports)
    profiles = workdir / "profiles.toml"
    profiles.write_text(PROFILES, encoding="utf-8")
    started = time.perf_counter()
    folders = enroll_sim_devices(home, HW_CLASS, n, prefix="sim", classes=(HW_CLASS,))
    _say(f"enrolled {n} devices in {time.perf_counter() - started:.1f} s")
    home.add_account(ADMIN, "admin")
    home.add_account(BARE, "operator")
    broker = MosquittoBroker(
        folder=workdir / "broker", material=home.broker_material(), ports=ports
    )
    model = build_demo_models(workdir / "models")["digits-v1"].path
    broker.start()
    return _Fleet(workdir, home, broker, profiles, model, folders, processes)


def _spawn(target: Callable[..., None], *args: Any) -> tuple[Connection, Any]:
    parent, child = multiprocessing.get_context("spawn").Pipe()
    process = multiprocessing.get_context("spawn").Process(target=target, args=(child, *args))
    process.start()
    return parent, process


def _coordinator(fleet: _Fleet) -> subprocess.Popen[bytes]:
    log = (fleet.workdir / "coordinator.log").open("ab")
    command = [sys.executable, "-m", "edgefleet.cli", "--home", str(fleet.home.root)]
    command += ["coordinator", "run", "--classes", str(fleet.profiles)]
    command += ["--data", str(fleet.workdir / "coordinator")]
    root = Path(__file__).resolve().parent.parent
    env = os.environ | {"PYTHONPATH": str(root)}
    return subprocess.Popen(command, cwd=root, stdout=log, stderr=log, env=env)


@dataclass
class _Run:
    """One rollout under measurement: the parts this process talks to."""

    fleet: _Fleet
    slices: list[list[Path]]
    devices: _Pipes
    bare: _Pipes
    watch: _Watch
    probes: tuple[_Probe, _Probe]
    quiets: int = 0

    async def quiet(self) -> None:
        """Until no device has a changed state left to publish: the next manifest goes
        out to a fleet done with the last one, as after a real soak of minutes."""
        self.quiets += 1
        self.devices.send("quiet", self.quiets)
        await self.devices.gather("quiet", match=partial(_of_round, self.quiets))
        for probe in self.probes:
            await probe.sim.until_quiet()

    async def convergence(self, seen: _Seen) -> float:
        """From the watcher's receipt of a manifest to the last device verifying it."""
        reports = await self.devices.gather("verified", match=lambda r: r[1] == seen.seq)
        last = max([r[3] for r in reports] + [await p.took(seen.seq) for p in self.probes])
        return float(last - seen.at)

    async def wave_one(self, operator: Session) -> dict[str, Any]:
        fleet = self.fleet
        w1 = sum(fleet.in_wave_one(f) for f in fleet.folders)
        await self.quiet()
        await start_rollout(
            operator,
            fleet.home,
            fleet.model,
            rollout_id=ROLLOUT,
            classes=(HW_CLASS,),
            waves=WAVES,
            profiles=load_profiles(fleet.profiles),
            success_ratio=1.0,
            max_failure_ratio=0.0,
        )
        m1 = await self.watch.manifest(lambda m: m.cutoff_bp == round(WAVES[0] * BUCKETS / 100))
        _say(f"wave 1 manifest (seq {m1.seq}, {m1.size} bytes) out; {w1} devices in wave 1")
        await self.watch.status_when(
            lambda s: s.wave == 0 and s.counts.targeted == w1 and s.counts.healthy == w1 - 1
        )
        self.devices.send("hold", 0)
        await self.devices.gather("holding")
        await self.quiet()
        reported = await self.probes[0].report()
        m2 = await self.watch.manifest(lambda m: m.cutoff_bp == BUCKETS)
        latency = m2.at - reported
        _say(f"wave 1 decided {latency * 1000:.1f} ms after its last report")
        return {"wave_devices": [w1], "decision_ms": [latency * 1000], "manifests": [m1, m2]}

    async def wave_two(self) -> dict[str, Any]:
        fleet, n = self.fleet, len(self.fleet.folders)
        for conn, part in zip(self.devices.conns, self.slices, strict=True):
            conn.send(("until_held", sum(not fleet.in_wave_one(f) for f in part)))
        await self.devices.gather("held")
        burst = n - sum(fleet.in_wave_one(f) for f in fleet.folders) - 1
        self.bare.send("arm", 2 * burst)  # a telemetry summary and a health report each
        await self.bare.gather("armed")
        _say(f"wave 2: {burst} reports held; released at once")
        released = time.monotonic()
        self.devices.send("open", 0)
        counted = await self.watch.status_when(lambda s: s.wave == 1 and s.counts.healthy == n - 1)
        ((_, received, _),) = await self.bare.gather("bare")
        await self.quiet()
        reported = await self.probes[1].report()
        m3 = await self.watch.manifest(lambda m: m.cutoff_bp is None)
        latency = m3.at - reported
        await self.watch.status_when(lambda s: s.phase is Phase.COMPLETED)
        _say(f"completed; the last wave decided {latency * 1000:.1f} ms after its last report")
        return {
            "burst_devices": burst,
            "coordinator_ingest_s": counted - released,
            "bare_ingest_s": received - released,
            "decision_ms": [latency * 1000],
            "manifests": [m3],
        }


async def _rollout(fleet: _Fleet, coordinator: int) -> dict[str, Any]:
    """The rollout measured; the coordinator's RSS once it completed."""
    first, second = fleet.probes()
    slices = fleet.slices([f for f in fleet.folders if f not in (first, second)])
    spawned = [_spawn(_devices_worker, part) for part in slices]
    bare_conn, bare_process = _spawn(_bare_worker, fleet.home.service_endpoint(BARE))
    run = _Run(
        fleet,
        slices,
        _Pipes([conn for conn, _ in spawned]),
        _Pipes([bare_conn]),
        _Watch(),
        (_Probe(first), _Probe(second)),
    )
    started = time.monotonic()
    async with (
        Session(fleet.home.service_endpoint(WATCHER), client_id=WATCHER) as watcher,
        Session(fleet.home.service_endpoint(OPERATOR), client_id=OPERATOR) as operator,
    ):
        await watcher.subscribe(
            topics.class_manifest(HW_CLASS),
            topics.rollout_status(ROLLOUT),
            topics.coordinator_presence(),
        )
        tasks = [asyncio.create_task(run.watch.follow(watcher))]
        tasks += [asyncio.create_task(p.sim.run()) for p in run.probes]
        try:
            figures = await _measure(run, operator, started)
            figures["coordinator_rss_mb"] = round(_status_kb(coordinator, "VmRSS") / 1024, 1)
            figures["coordinator_peak_rss_mb"] = round(_status_kb(coordinator, "VmHWM") / 1024, 1)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for pipes in (run.devices, run.bare):
                pipes.send("stop", 0)
                pipes.close()
            for process in [p for _, p in spawned] + [bare_process]:
                await asyncio.to_thread(process.join, 30)
    return figures


async def _measure(run: _Run, operator: Session, started: float) -> dict[str, Any]:
    await run.devices.gather("up")
    await run.bare.gather("up")
    for probe in run.probes:
        await probe.sim.until_connected()
    connect_s = time.monotonic() - started
    _say(f"{len(run.fleet.folders)} devices connected in {connect_s:.1f} s")
    await run.watch.until(lambda: run.watch.coordinator_online)
    one = await run.wave_one(operator)
    two = await run.wave_two()
    manifests = one["manifests"] + two["manifests"]
    convergence = [await run.convergence(m) for m in manifests]
    return {
        "connect_all_s": round(connect_s, 2),
        "decision_ms": [round(ms, 1) for ms in one["decision_ms"] + two["decision_ms"]],
        "wave_one_devices": one["wave_devices"][0],
        "burst_devices": two["burst_devices"],
        "coordinator_ingest_s": round(two["coordinator_ingest_s"], 3),
        "bare_ingest_s": round(two["bare_ingest_s"], 3),
        "convergence_s": [round(c, 3) for c in convergence],
        "manifest_bytes": max(m.size for m in manifests),
    }


async def _fanout(fleet: _Fleet, size: int) -> list[float]:
    """The baseline of convergence: a same-size payload, retained on the class manifest,
    fanned out to bare subscribers on every device's identity, each verifying an Ed25519
    signature on it. From the publisher's own receipt to the last verification; as many
    rounds, one after the other, as the rollout has manifests."""
    key = Ed25519PrivateKey.generate()
    spawned = [
        _spawn(_fanout_worker, part, key.public_key().public_bytes_raw())
        for part in fleet.slices(fleet.folders)
    ]
    pipes = _Pipes([conn for conn, _ in spawned])
    topic = topics.class_manifest(HW_CLASS)
    took: list[float] = []
    try:
        await pipes.gather("up")
        async with Session(fleet.home.service_endpoint(ADMIN), client_id=ADMIN) as admin:
            messages = aiter(admin.messages())
            await admin.subscribe(topic)
            for round_ in range(FANOUT_ROUNDS):
                body = os.urandom(size - 64)
                await admin.publish(topic, key.sign(body) + body, retain=True)
                async with asyncio.timeout(_STEP_TIMEOUT_S):
                    while (await anext(messages)).retain:
                        pass
                sent = time.monotonic()
                fanned = await pipes.gather("fanned", match=partial(_of_round, round_))
                took.append(float(max(r[3] for r in fanned) - sent))
        return took
    finally:
        pipes.send("stop", 0)
        pipes.close()
        for _, process in spawned:
            await asyncio.to_thread(process.join, 30)


async def _bench(fleet: _Fleet) -> dict[str, Any]:
    coordinator = _coordinator(fleet)
    try:
        figures = await _rollout(fleet, coordinator.pid)
    finally:
        coordinator.send_signal(signal.SIGTERM)
        await asyncio.to_thread(coordinator.wait, 30)
    _say("coordinator stopped; fan-out baseline on bare sessions of the same identities")
    fanouts = await _fanout(fleet, figures["manifest_bytes"])
    figures["fanout_s"] = [round(f, 3) for f in fanouts]
    return figures


def _summary(figures: dict[str, Any], n: int, processes: int) -> dict[str, Any]:
    burst_messages = 2 * figures["burst_devices"]
    worst_convergence = max(figures["convergence_s"])
    figures["fanout_baseline_s"] = max(figures["fanout_s"])
    figures |= {
        "devices": n,
        "processes": processes,
        "cpus": os.cpu_count(),
        "decision_latency_ms": max(figures["decision_ms"]),
        "coordinator_ingest_rate_per_s": round(burst_messages / figures["coordinator_ingest_s"]),
        "bare_ingest_rate_per_s": round(burst_messages / figures["bare_ingest_s"]),
        "ingest_ratio": round(figures["bare_ingest_s"] / figures["coordinator_ingest_s"], 3),
        "convergence_worst_s": worst_convergence,
        "convergence_vs_fanout": round(worst_convergence / figures["fanout_baseline_s"], 3),
        "convergence_vs_fanout_median": round(
            statistics.median(figures["convergence_s"]) / statistics.median(figures["fanout_s"]), 3
        ),
    }
    figures["goals"] = {
        "decision_latency_le_100ms": figures["decision_latency_ms"] <= 100,
        "ingest_ratio_ge_0_5": figures["ingest_ratio"] >= 0.5,
        "convergence_le_1_5x": figures["convergence_vs_fanout"] <= 1.5,
    }
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000, help="simulated devices")
    parser.add_argument("--processes", type=int, default=2, help="device worker processes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-bench-fleet-"))
    fleet: _Fleet | None = None
    try:
        workdir.chmod(0o755)  # Mosquitto drops root to its own account: it must get in
        fleet = _setup(workdir, args.devices, args.processes)
        figures = asyncio.run(_bench(fleet))
    finally:
        if fleet is not None:
            fleet.broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    figures = _summary(figures, args.devices, args.processes)
    _say(
        f"decision {figures['decision_ms']} ms; ingest ratio {figures['ingest_ratio']}; "
        f"convergence {figures['convergence_s']} s vs fan-out {figures['fanout_s']} s"
    )
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
