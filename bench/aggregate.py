"""What the fleet telemetry aggregation costs the coordinator at fleet rates, against
the ledger's own counting of the same summaries, measured in one run on this machine.

``--devices`` devices (default 10,000) of one class, half on the stable release and half
on a candidate, each send a summary every 10 s (1,000 summaries a second at 10,000) for
``--minutes`` simulated minutes: realistic summaries (300 inferences, a lognormal latency
histogram, ten labels). Every summary goes, in order, through:

* the baseline: :meth:`coordinator.ledger.TelemetryLedger.offer`, the ledger's counting
  that every summary costs already (its mark judged and kept; no store in the loop);
* the aggregation: the device's class read from a real :class:`coordinator.fleet.FleetView`
  and :meth:`coordinator.aggregate.Aggregator.add` (what ``Reporter.counted`` does);

microseconds per summary each, and their ratio; for scale, what reading a summary off the
wire costs the ingest (``decode``, on a sample of ``SAMPLE`` per period); and every 10
simulated seconds a tick (windows advanced, drift and health judged, snapshots built),
with its snapshot's encoded size. Then the same again with hostile summaries: 256
distinct labels of 64 characters each, all new every window, and latency buckets spread
over the whole range. The last figure is the share of one core the aggregation takes at
the fleet's rate.

Human-readable lines come first; the last line is one JSON object with every figure.

Run from the repository root, as a module (it builds summaries with the tests' helpers):
``.venv/bin/python -m bench.aggregate [--devices N] [--minutes N]``
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from coordinator.aggregate import Aggregator, Named
from coordinator.drift import DriftPolicy
from coordinator.fleet import FleetView
from coordinator.ledger import TELEMETRY_FILENAME, TelemetryLedger
from coordinator.metrics import Counters
from schemas import LogHistogram, ReleaseRole, TelemetrySummary, decode, encode
from schemas.telemetry import MAX_LABEL_CHARS, MAX_LABELS
from tests.coordinator.records import CLASS, device_state, make_release
from tests.coordinator.summaries import numbered

START = 1_700_000_040.0
SAMPLE = 500
"""Summaries per period decoded to measure what reading one costs."""
PERIOD_S = 10.0
"""Each device's telemetry window, and the reporter's tick."""
STABLE = make_release("digits-v1", "cd" * 32)
CANDIDATE = make_release("digits-v2", "ab" * 32)


def _templates(hostile: bool, rng: random.Random) -> list[TelemetrySummary]:
    """A few summaries to send round-robin (their numbers are set per device)."""
    found = []
    for n in range(8):
        if hostile:
            buckets = sorted({rng.randrange(-100, 200) for _ in range(120)})
            latency = LogHistogram(buckets=tuple((b, 1 + b % 3) for b in buckets))
            labels = {f"{n}-{i}-".ljust(MAX_LABEL_CHARS, "z"): 1 for i in range(MAX_LABELS)}
        else:
            latency = LogHistogram.of(rng.lognormvariate(0.5, 0.5) for _ in range(300))
            labels = {str(d): 25 + rng.randrange(10) for d in range(10)}
        confidence = tuple(rng.randrange(60) for _ in range(10))
        found.append(
            numbered(1).model_copy(
                update={
                    "count": 300,
                    "errors": rng.randrange(3),
                    "latency_ms": latency,
                    "confidence": confidence,
                    "labels": labels,
                }
            )
        )
    return found


def _period(
    templates: list[TelemetrySummary], devices: int, period: int, hostile: bool
) -> list[TelemetrySummary]:
    """Every device's summary for one period (numbered in order per device)."""
    end = START + (period + 1) * PERIOD_S
    if hostile:  # new labels every window: the worst for the vocabularies
        templates = [
            t.model_copy(update={"labels": {f"{period}{k}"[:MAX_LABEL_CHARS]: 1 for k in t.labels}})
            for t in templates
        ]
    return [
        templates[(i + period) % len(templates)].model_copy(
            update={
                "device_id": f"cam-{i:05d}",
                "release": (STABLE if i % 2 else CANDIDATE).release_id,
                "window_end": end,
                "seq": period + 1,
                "last_seq": period + 1,
                "base": 1,
            }
        )
        for i in range(devices)
    ]


def _timed(fn: Callable[[], None]) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _run(devices: int, minutes: int, hostile: bool, folder: Path) -> dict[str, float]:
    templates = _templates(hostile, random.Random(11))  # noqa: S311 (made-up telemetry)
    fleet = FleetView()
    for i in range(devices):
        fleet.on_state(device_state(f"cam-{i:05d}"))
    views = fleet.devices
    ledger = TelemetryLedger(folder / f"{hostile}-{TELEMETRY_FILENAME}", counters=Counters())
    engine = Aggregator({CLASS: DriftPolicy()}, now=START)
    engine.name(
        {
            CLASS: {
                STABLE.release_id: Named(ReleaseRole.STABLE, STABLE.health),
                CANDIDATE.release_id: Named(ReleaseRole.CANDIDATE, CANDIDATE.health, "r1"),
            }
        }
    )
    summaries = decoded = 0
    offer_s = add_s = decode_s = 0.0
    ticks_ms: list[float] = []
    size = 0
    for period in range(int(minutes * 60 / PERIOD_S)):
        batch = _period(templates, devices, period, hostile)
        now = START + (period + 1) * PERIOD_S
        summaries += len(batch)

        def offer(batch: list[TelemetrySummary] = batch) -> None:
            for summary in batch:
                ledger.offer(summary)

        def add(batch: list[TelemetrySummary] = batch, now: float = now) -> None:
            for summary in batch:
                view = views.get(summary.device_id)
                engine.add(None if view is None else view.hw_class, summary, now)

        wire = [encode(summary) for summary in batch[:SAMPLE]]

        def read(wire: list[bytes] = wire) -> None:
            for payload in wire:
                decode(payload, TelemetrySummary)

        decode_s += _timed(read)
        decoded += len(wire)
        offer_s += _timed(offer)
        add_s += _timed(add)
        tick_start = time.perf_counter()
        tick = engine.tick(now + 0.5)
        ticks_ms.append((time.perf_counter() - tick_start) * 1e3)
        size = len(encode(tick.classes[CLASS]))
    if engine.stats.added != summaries or ledger.mark("cam-00000") is None:
        msg = f"aggregated {engine.stats.added} of {summaries} summaries"
        raise SystemExit(msg)
    offer_us = offer_s * 1e6 / summaries
    add_us = add_s * 1e6 / summaries
    rate = devices / PERIOD_S
    return {
        "summaries": summaries,
        "ledger_offer_us": round(offer_us, 2),
        "aggregate_add_us": round(add_us, 2),
        "add_over_offer": round(add_us / offer_us, 2),
        "decode_us": round(decode_s * 1e6 / decoded, 2),
        "tick_ms_median": round(statistics.median(ticks_ms), 3),
        "tick_ms_max": round(max(ticks_ms), 3),
        "snapshot_bytes": size,
        "core_share_at_fleet_rate": round(
            (rate * add_us + max(ticks_ms) * 1e3 / PERIOD_S) / 1e6, 4
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--minutes", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        plain = _run(args.devices, args.minutes, hostile=False, folder=Path(folder))
        hostile = _run(args.devices, 1, hostile=True, folder=Path(folder))
    rate = args.devices / PERIOD_S
    print(f"{args.devices} devices, a summary each every {PERIOD_S:g} s ({rate:g}/s)")
    for name, figures in (("realistic", plain), ("hostile", hostile)):
        print(
            f"  {name}: ledger {figures['ledger_offer_us']} us, aggregation "
            f"{figures['aggregate_add_us']} us per summary ({figures['add_over_offer']}x; "
            f"decoding one: {figures['decode_us']} us); "
            f"tick {figures['tick_ms_median']} ms (max {figures['tick_ms_max']}), snapshot "
            f"{figures['snapshot_bytes']} B; {figures['core_share_at_fleet_rate'] * 100:.1f} % "
            "of a core at the fleet's rate"
        )
    result: dict[str, object] = {
        "devices": args.devices,
        "summaries_per_s": rate,
        **plain,
        **{f"hostile_{k}": v for k, v in hostile.items()},
        "python": sys.version.split()[0],
    }
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
