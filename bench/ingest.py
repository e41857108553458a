"""The coordinator's ingest under a burst, against a real Mosquitto from the repo's config,
measured in one run on this machine.

``--messages`` device messages (default 10,000: a third each of states, health reports
and telemetry summaries, real schemas, a realistic telemetry histogram) are published,
QoS 1, while the coordinator's persistent session is away; the broker queues them. Then
the session comes back and the real :class:`coordinator.ingest.Ingest` takes the burst
(the broker sends it as fast as the session acknowledges), into a real fleet view and
telemetry ledger; the fence it publishes right after connecting comes back behind the
last of them, as on every coordinator reconnect (``coordinator.clock``). Measured, for
each way of handling:

* ``one_at_a_time`` (the baseline): ``ingest_batch=1``, every message read (topic
  parsed, payload decoded) and applied on the event loop, one after the other;
* ``batched``: the shipped limits, a batch of what is waiting read in one thread hop
  once it is ``ingest_thread_min`` long, then applied on the loop in order;

the time from connect until the fence came back (throughput), and the event loop's
longest stall while it ran: the worst lateness of a task that sleeps 1 ms in a loop
(and its 99th percentile). Floors: a bare loop reading the same messages (parse and
decode, nothing else), and a bare session taking the same burst without handling it.
The run fails if a mode loses or drops anything.

Human-readable lines come first; the last line is one JSON object with every figure.

Run from the repository root, as a module: ``.venv/bin/python -m bench.ingest
[--messages N]``
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from broker.acl import Accounts
from broker.session import Session
from broker.transport import Endpoint
from coordinator import CoordinatorLimits
from coordinator.core import Core
from coordinator.fetching import Fetcher
from coordinator.ingest import Ingest
from coordinator.intake import Intake
from coordinator.keeper import Keeper
from coordinator.ledger import TELEMETRY_FILENAME, TelemetryLedger
from coordinator.metrics import Counters
from coordinator.signer import Signer
from schemas import (
    DeviceState,
    HealthReport,
    KeyPair,
    LogHistogram,
    TelemetrySummary,
    decode,
    encode,
    topics,
)
from schemas.topics import DeviceChannel
from tests.broker.localfleet import LocalFleet, broker_tempdir
from tests.coordinator.kit import make_config
from tests.coordinator.records import T0, device_state, health_report
from tests.coordinator.summaries import numbered

PUBLISHER = "bench-publisher"
WINDOW = 500  # publishes in flight at once while filling the broker's queue
_MODELS: dict[DeviceChannel, type[DeviceState | HealthReport | TelemetrySummary]] = {
    DeviceChannel.STATE: DeviceState,
    DeviceChannel.HEALTH: HealthReport,
    DeviceChannel.TELEMETRY: TelemetrySummary,
}


def _burst(devices: int) -> list[tuple[str, bytes]]:
    """State, health and a telemetry summary of every device, as agents send them."""
    rng = random.Random(7)  # noqa: S311 (made-up latencies)
    burst: list[tuple[str, bytes]] = []
    for i in range(devices):
        device_id = f"cam-{i:05d}"
        summary = numbered(1).model_copy(
            update={
                "device_id": device_id,
                "release": "digits-v2-fp32",
                "latency_ms": LogHistogram.of(rng.lognormvariate(1.5, 0.6) for _ in range(600)),
                "labels": {str(d): 60 for d in range(10)},
                "confidence": (60,) * 10,
                "max_rss_bytes": 123_456_789,
            }
        )
        report = health_report(
            device_id,
            release="digits-v2-fp32",
            inferences=600,
            p95_latency_ms=7.5,
            soak_seconds=60.0,
        )
        burst += [
            (topics.device(device_id, DeviceChannel.STATE), encode(device_state(device_id))),
            (topics.device(device_id, DeviceChannel.HEALTH), encode(report)),
            (topics.device(device_id, DeviceChannel.TELEMETRY), encode(summary)),
        ]
    return burst


def _bare_read(burst: list[tuple[str, bytes]]) -> float:
    """Seconds to parse every topic and decode every payload in a plain loop."""
    start = time.perf_counter()
    for topic, payload in burst:
        channel = topics.parse(topic).channel
        assert channel is not None
        decode(payload, _MODELS[channel])
    return time.perf_counter() - start


async def _fill(publisher: Endpoint, burst: list[tuple[str, bytes]]) -> None:
    """Publish the burst while the coordinator's session is away: the broker queues it."""
    async with Session(publisher, client_id=PUBLISHER) as session:
        for first in range(0, len(burst), WINDOW):
            window = burst[first : first + WINDOW]
            await asyncio.gather(*(session.publish(t, p) for t, p in window))


def _coordinator(fleet: LocalFleet) -> Session:
    """The coordinator's persistent session: the broker queues for it while it is away."""
    endpoint = fleet.service_endpoint("coordinator")
    return Session(endpoint, client_id="coordinator", clean_start=False, session_expiry=600)


@dataclass
class _Stalls:
    """A task that sleeps 1 ms in a loop, and how late it woke each time."""

    late_s: list[float]

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.001)
            self.late_s.append(loop.time() - before - 0.001)


async def _measured(until: Callable[[], Awaitable[None]]) -> dict[str, float]:
    """Run ``until`` beside the stall ticker; seconds taken and the stalls seen."""
    stalls = _Stalls([])
    collections: list[float] = []
    began = [0.0]

    def collecting(phase: str, _info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            collections.append(time.perf_counter() - began[0])

    ticker = asyncio.create_task(stalls.run())
    gc.callbacks.append(collecting)
    start = time.perf_counter()
    try:
        await until()
    finally:
        gc.callbacks.remove(collecting)
        ticker.cancel()
    seconds = time.perf_counter() - start
    late = sorted(stalls.late_s) or [0.0]
    return {
        "seconds": seconds,
        "stall_max_ms": late[-1] * 1e3,
        "stall_p99_ms": late[int(0.99 * (len(late) - 1))] * 1e3,
        "stall_median_ms": statistics.median(late) * 1e3,
        "gc_max_ms": max(collections, default=0.0) * 1e3,
    }


async def _ingest_run(
    fleet: LocalFleet, folder: Path, burst: list[tuple[str, bytes]], limits: CoordinatorLimits
) -> dict[str, float]:
    """The burst through a real ingest; its figures."""
    devices = len(burst) // 3
    config = make_config(folder, KeyPair.generate(), limits=limits)
    core = Core(config, clock=lambda: T0)
    counters = Counters()
    ledger = TelemetryLedger(folder / TELEMETRY_FILENAME, counters=counters, clock=lambda: T0)
    fetcher = Fetcher(core)
    keeper = Keeper(core, fetcher)
    ingest = Ingest(
        core, Intake(core, fetcher, keeper, Signer(core)), keeper, ledger=ledger, counters=counters
    )
    await _fill(fleet.service_endpoint(PUBLISHER), burst)
    try:
        async with _coordinator(fleet) as session:

            async def fenced() -> None:
                dispatch = asyncio.create_task(ingest.dispatch(session))
                fence = core.settling.linked(session.generation, core.monotonic())
                await session.publish(topics.coordinator_fence(), fence)
                while not core.settling.fenced:
                    core.changed.clear()
                    await core.changed.wait()
                dispatch.cancel()

            figures = await _measured(fenced)
    finally:
        core.store.close()
    views = core.fleet.devices.values()
    got = (
        sum(v.state is not None for v in views),
        sum(v.health is not None for v in views),
        counters.telemetry_counted,
        counters.messages_dropped,
    )
    if got != (devices, devices, devices, 0):
        msg = f"states, health, telemetry, dropped: {got}, expected {devices} each and 0"
        raise RuntimeError(msg)
    return {
        **figures,
        "batches": counters.ingest_batches,
        "batches_threaded": counters.ingest_batches_threaded,
        "messages_threaded": counters.ingest_messages_threaded,
    }


async def _bare_take(fleet: LocalFleet, burst: list[tuple[str, bytes]]) -> dict[str, float]:
    """The burst taken by a bare session (no handling): the transport's floor."""
    await _fill(fleet.service_endpoint(PUBLISHER), burst)
    async with _coordinator(fleet) as session:

        async def taken() -> None:
            messages = session.messages()
            count = 0
            while count < len(burst):
                await anext(messages)
                count += 1 + len(session.take_waiting(len(burst)))

        return await _measured(taken)


async def _bench(
    fleet: LocalFleet, folder: Path, burst: list[tuple[str, bytes]], rounds: int
) -> dict[str, dict[str, float]]:
    """Every mode ``rounds`` times, interleaved; the median of each figure."""
    async with _coordinator(fleet) as session:
        await session.subscribe(
            *(topics.all_devices(c) for c in DeviceChannel), topics.coordinator_fence()
        )
    modes = {
        "one_at_a_time": CoordinatorLimits(ingest_batch=1),
        "batched_on_loop": CoordinatorLimits(ingest_thread_min=1_000_000),
        "batched": CoordinatorLimits(),
    }
    runs: dict[str, list[dict[str, float]]] = {"bare_take": [], **{name: [] for name in modes}}
    for round_ in range(rounds):
        runs["bare_take"].append(await _bare_take(fleet, burst))
        for name, limits in modes.items():
            (folder / f"{name}-{round_}").mkdir()
            runs[name].append(await _ingest_run(fleet, folder / f"{name}-{round_}", burst, limits))
    return {
        name: {key: statistics.median(r[key] for r in results) for key in results[0]}
        for name, results in runs.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    burst = _burst(max(1, args.messages // 3))
    bare_read_s = _bare_read(burst)
    accounts = Accounts(admins=(PUBLISHER,))
    with (
        broker_tempdir("edgefleet-bench-ingest-") as tmp,
        LocalFleet(tmp, accounts=accounts) as fleet,
    ):
        runs = asyncio.run(_bench(fleet, tmp, burst, max(1, args.rounds)))
    n = len(burst)
    base, batched, bare = runs["one_at_a_time"], runs["batched"], runs["bare_take"]
    figures: dict[str, object] = {
        "messages": n,
        "rounds": args.rounds,
        "bare_read_rate_per_s": round(n / bare_read_s),
        "bare_read_us_per_message": round(bare_read_s * 1e6 / n, 2),
        "bare_take_rate_per_s": round(n / bare["seconds"]),
        "python": sys.version.split()[0],
    }
    for name, run in runs.items():
        figures[f"{name}_rate_per_s"] = round(n / run["seconds"])
        for key in ("stall_max_ms", "stall_p99_ms", "stall_median_ms", "gc_max_ms"):
            figures[f"{name}_{key}"] = round(run[key], 2)
    for key in ("batches", "batches_threaded", "messages_threaded"):
        figures[f"batched_{key}"] = batched[key]
    figures["stall_max_ratio"] = round(base["stall_max_ms"] / batched["stall_max_ms"], 2)
    figures["stall_p99_ratio"] = round(base["stall_p99_ms"] / batched["stall_p99_ms"], 2)
    figures["rate_ratio"] = round(base["seconds"] / batched["seconds"], 3)
    print(f"{n} device messages through the coordinator's ingest, over Mosquitto (medians)")
    print(f"  bare read (parse + decode): {figures['bare_read_us_per_message']} us/message")
    for name in ("bare_take", "one_at_a_time", "batched_on_loop", "batched"):
        print(
            f"  {name}: {figures[f'{name}_rate_per_s']}/s, loop stall max "
            f"{figures[f'{name}_stall_max_ms']} ms, p99 {figures[f'{name}_stall_p99_ms']} ms "
            f"(longest garbage collection {figures[f'{name}_gc_max_ms']} ms)"
        )
    print(
        f"  batched: {batched['batches']} batches, {batched['batches_threaded']} read in a "
        f"thread ({batched['messages_threaded']} messages)"
    )
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
