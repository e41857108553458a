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
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
)

from bench.fleetprocs import (
    BARE,
    FANOUT_ROUNDS,
    HW_CLASS,
    SOAK_S,
    bare_worker,
    devices_worker,
    fanout_worker,
    raise_fd_limit,
)
from bench.fleetwatch import ROLLOUT, STEP_TIMEOUT_S, Pipes, Probe, Seen, Watch
from broker.config import BrokerPorts
from broker.launcher import MosquittoBroker, free_ports
from broker.session import Session
from coordinator import load_profiles
from edgefleet.compose import start_rollout
from edgefleet.home import OPERATOR, WATCHER, Home
from edgefleet.simcli import enroll_sim_devices
from models import build_demo_models
from schemas import (
    Phase,
    bucket,
    topics,
)
from schemas.manifest import BUCKETS

WAVES: Final = (10.0, 100.0)
ADMIN: Final = "bench-admin"
PROFILES: Final = f"""
[classes.{HW_CLASS}]
providers = ["CPUExecutionProvider"]
max_model_bytes = 20_000_000
health = {{ max_error_rate = 0.01, p95_latency_ms = 10.0, min_inferences = 20, \
soak_seconds = {SOAK_S} }}
rollout = {{ success_ratio = 1.0, max_failure_ratio = 0.0, wave_timeout_s = 1800 }}
"""
"""Baseline fan-outs: as many as the rollout's manifests (two waves, the promotion)."""


def _say(line: str) -> None:
    print(line, flush=True)


def _of_round(round_: int, report: tuple[Any, ...]) -> bool:
    return bool(report[1] == round_)


def _status_kb(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1])
    return 0


# -- worker processes ------------------------------------------------------------------


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
    devices: Pipes
    bare: Pipes
    watch: Watch
    probes: tuple[Probe, Probe]
    quiets: int = 0

    async def quiet(self) -> None:
        """Until no device has a changed state left to publish: the next manifest goes
        out to a fleet done with the last one, as after a real soak of minutes."""
        self.quiets += 1
        self.devices.send("quiet", self.quiets)
        await self.devices.gather("quiet", match=partial(_of_round, self.quiets))
        for probe in self.probes:
            await probe.sim.until_quiet()

    async def convergence(self, seen: Seen) -> float:
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
    spawned = [_spawn(devices_worker, part) for part in slices]
    bare_conn, bare_process = _spawn(bare_worker, fleet.home.service_endpoint(BARE))
    run = _Run(
        fleet,
        slices,
        Pipes([conn for conn, _ in spawned]),
        Pipes([bare_conn]),
        Watch(),
        (Probe(first), Probe(second)),
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
        _spawn(fanout_worker, part, key.public_key().public_bytes_raw())
        for part in fleet.slices(fleet.folders)
    ]
    pipes = Pipes([conn for conn, _ in spawned])
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
                async with asyncio.timeout(STEP_TIMEOUT_S):
                    while (await anext(messages)).retain:
                        pass  # the copy retained from the round before: not this round's
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
    raise_fd_limit()
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
