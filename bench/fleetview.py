"""The coordinator's wave counts at fleet scale, kept as devices report against a full
recount, measured in one run on this machine.

``--devices`` simulated devices (default 10,000) of one class send their retained
presence and state into a :class:`coordinator.fleet.FleetView`, half of them inside the
rollout's current wave; then health reports arrive between ticks. Measured:

* the per-tick cost of the counts: the baseline reads every device again
  (``tests.coordinator.recount``, how ``FleetView.counts`` counted before), the fleet
  view returns the counts it kept; median of ``--ticks`` ticks each, and the ratio;
* what keeping them costs each message: presence and state fed with no rollout watched
  and with one;
* that both give the same counts at every tick (the run fails otherwise).

Human-readable lines come first; the last line is one JSON object with every figure.

Run from the repository root, as a module (the baseline recount is the tests' reference):
``.venv/bin/python -m bench.fleetview [--devices N] [--ticks N]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

from coordinator.fleet import FleetView
from coordinator.rollout import RolloutRecord
from schemas import DeviceState, HealthReport, Verdict, WaveCounts
from tests.coordinator.records import CLASS, T0, device_state, make_record
from tests.coordinator.recount import recount


def _report(record: RolloutRecord, device_id: str, n: int) -> HealthReport:
    return HealthReport(
        report_id=f"{device_id}-{n}",
        device_id=device_id,
        rollout_id=record.id,
        manifest_seq=4,
        release=record.release_id,
        verdict=Verdict.UNHEALTHY if n % 7 == 0 else Verdict.HEALTHY,
        inferences=100,
        errors=0,
        p95_latency_ms=1.0,
        soak_seconds=4.0,
        at=T0 + n,
    )


def _feed(fleet: FleetView, ids: list[str], states: list[DeviceState]) -> float:
    """Presence and state of every device; microseconds per message."""
    start = time.perf_counter()
    for device_id, state in zip(ids, states, strict=True):
        fleet.on_presence(device_id, online=True)
        fleet.on_state(state)
    return (time.perf_counter() - start) * 1e6 / (2 * len(ids))


def _timed(fn: Callable[[], WaveCounts]) -> tuple[float, WaveCounts]:
    start = time.perf_counter()
    counts = fn()
    return (time.perf_counter() - start) * 1e3, counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--ticks", type=int, default=50)
    args = parser.parse_args(argv)

    record = make_record(wave=1)  # 50 %: half the fleet is in the wave
    sha = record.candidates[CLASS].artifact.sha256
    ids = [f"cam-{i:05d}" for i in range(args.devices)]
    states = [device_state(d, sha256=sha if i % 2 else None) for i, d in enumerate(ids)]

    unwatched = _feed(FleetView(), ids, states)
    fleet = FleetView()
    fleet.counts(record, CLASS)  # watched from the start, as a live rollout is
    watched = _feed(fleet, ids, states)

    baseline_ms: list[float] = []
    kept_ms: list[float] = []
    members = len([d for d in fleet.devices.values() if fleet.in_cohort(record, d)])
    for tick in range(args.ticks):
        for n in range(tick * 20, tick * 20 + 20):  # reports between two ticks
            fleet.on_health(_report(record, ids[n % len(ids)], n))
        fleet.tick(float(tick))
        base, expected = _timed(lambda: recount(fleet, record, CLASS))
        kept, counts = _timed(lambda: fleet.counts(record, CLASS))
        if counts != expected:
            print(f"tick {tick}: kept {counts} != recount {expected}", file=sys.stderr)
            return 1
        baseline_ms.append(base)
        kept_ms.append(kept)

    base = statistics.median(baseline_ms)
    kept = statistics.median(kept_ms)
    figures = {
        "devices": args.devices,
        "wave_members": members,
        "ticks": args.ticks,
        "tick_recount_ms": round(base, 3),
        "tick_kept_ms": round(kept, 4),
        "tick_speedup": round(base / kept, 1),
        "message_us_unwatched": round(unwatched, 2),
        "message_us_one_rollout": round(watched, 2),
        "python": sys.version.split()[0],
    }
    print(f"{args.devices} devices, {members} in the wave, {args.ticks} ticks")
    print(f"  counts per tick: recount {base:.2f} ms, kept {kept * 1e3:.1f} us")
    print(f"  per message: {unwatched:.2f} us unwatched, {watched:.2f} us with one rollout")
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
