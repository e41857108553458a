"""What a Prometheus scrape of the coordinator costs at fleet scale, measured in one run.

``--devices`` simulated devices (default 10,000) in four classes, each on one of three
releases, in every mode, most online, send presence and state into a
:class:`coordinator.fleet.FleetView`. Measured:

* what keeping the census costs each message (presence and state, as fed);
* one scrape's reading and text exposition (``coordinator.exporter.families`` and
  prometheus_client's ``generate_latest``) from the census the view keeps, against the
  baseline that walks the whole fleet to count it; median of ``--scrapes`` each, and the
  ratio;
* that both count the same (the run fails otherwise).

The last line is one JSON object with every figure.
Run from the repository root: ``.venv/bin/python -m bench.metrics [--devices N]``
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from coordinator.config import MetricsConfig
from coordinator.exporter import Scrape, families
from coordinator.fleet import Census, FleetView
from coordinator.metrics import Counters
from schemas import Mode
from tests.coordinator.records import T0, census_by_walk, device_state

CLASSES = ("jetson-vision-standard", "intel-lowpower-detector", "factory-gateway-gpu", "cart")
RELEASES = ("digits-v1:fp32@0123456789ab", "digits-v2:fp16@abcdef012345", "digits-v3:int8@aa")


class _Once(Collector):
    def __init__(self, read: Callable[[], list[Metric]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        return self._read()


def _scrape_ms(census: Callable[[], dict[Census, int]], times: int) -> tuple[float, bytes]:
    config = MetricsConfig()

    def read() -> list[Metric]:
        scrape = Scrape(
            census=census(),
            rollouts=(),
            counters=Counters(),
            view_age_s=1.0,
            view_complete=True,
            connected=True,
        )
        return families(scrape, config)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Once(read))
    took = []
    text = b""
    for _ in range(times):
        start = time.perf_counter()
        text = generate_latest(registry)
        took.append((time.perf_counter() - start) * 1e3)
    return statistics.median(took), text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--scrapes", type=int, default=20)
    args = parser.parse_args()
    rng = random.Random(11)  # noqa: S311 (a made-up fleet)
    fleet = FleetView()
    ids = [f"dev-{i:05d}" for i in range(args.devices)]
    states = [
        device_state(
            device_id,
            hw_class=rng.choice(CLASSES),
            active_release=rng.choice(RELEASES),
            mode=rng.choice(list(Mode)),
            updated_at=T0,
        )
        for device_id in ids
    ]
    start = time.perf_counter()
    for device_id, state in zip(ids, states, strict=True):
        fleet.on_presence(device_id, rng.random() < 0.9)
        fleet.on_state(state)
    message_us = (time.perf_counter() - start) * 1e6 / (2 * len(ids))

    if fleet.census() != census_by_walk(fleet):
        print("the census kept differs from a walk of the fleet", file=sys.stderr)
        return 1
    walk_ms, walk_text = _scrape_ms(lambda: census_by_walk(fleet), args.scrapes)
    kept_ms, kept_text = _scrape_ms(fleet.census, args.scrapes)
    if walk_text != kept_text:
        print("the two scrapes differ", file=sys.stderr)
        return 1
    series = len(fleet.census())
    figures = {
        "devices": args.devices,
        "device_series": series,
        "scrapes": args.scrapes,
        "message_us": round(message_us, 2),
        "scrape_walk_ms": round(walk_ms, 3),
        "scrape_kept_ms": round(kept_ms, 3),
        "scrape_speedup": round(walk_ms / kept_ms, 1),
        "exposition_bytes": len(kept_text),
        "python": sys.version.split()[0],
    }
    print(f"{args.devices} devices in {series} census series")
    print(f"  per message (presence, state): {message_us:.2f} us")
    print(f"  one scrape: walking the fleet {walk_ms:.2f} ms, from the census {kept_ms:.2f} ms")
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
