"""The coordinator's metrics for Prometheus: ``/metrics`` on an address of its config.

What is exported, all read on the event loop at scrape time:

* ``edgefleet_devices{hw_class,release,mode,online}``: the fleet view's census, which it
  keeps as devices change (``FleetView.census``), so a scrape costs O(the distinct
  combinations), never a walk of the fleet. The labels come from what devices say of
  themselves: each is cut to ``LABEL_CHARS`` and at most ``MetricsConfig.device_series``
  series are shown, the smallest summed into one labelled ``other``.
* ``edgefleet_rollout_phase``, ``_wave`` and, per class, ``edgefleet_rollout_class_phase``,
  ``_wave`` and ``_devices`` (the wave's counts): the live rollouts and the latest
  ``finished_rollouts`` finished ones.
* ``edgefleet_messages_ingested_total``, ``edgefleet_messages_refused_total{reason}`` (a
  bounded set of reasons, ``coordinator.metrics.REFUSALS``) and every other count of
  :class:`~coordinator.metrics.Counters` as ``edgefleet_coordinator_<name>_total``.
* ``edgefleet_fleet_view_age_seconds``, ``edgefleet_fleet_view_complete`` and
  ``edgefleet_coordinator_connected``.
* ``edgefleet_store_write_seconds{store}``: the coordinator store's writes and the
  telemetry ledger's commits, each timed around its thread.
* ``process_*``: prometheus_client's process collector (CPU, memory, open files).

prometheus_client serves HTTP on a thread of its own (a thread per request); a scrape
hands the reading to the event loop and waits for it, so nothing is read while a service
changes it, and the loop pays only while someone scrapes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Final
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from coordinator.config import MetricsConfig
from coordinator.core import Core
from coordinator.fleet import Census
from coordinator.metrics import REFUSALS, WRITE_BUCKETS_S, Counters, Latency
from coordinator.rollout import RolloutRecord
from schemas import LanePhase, Phase
from schemas.errors import bound_text

__all__ = ["LABEL_CHARS", "OTHER", "SCRAPE_TIMEOUT_S", "Exporter", "Scrape", "families"]

log = logging.getLogger(__name__)

LABEL_CHARS: Final = 64
"""A label value from input (a class, a release, a rollout id) is cut to this."""
OTHER: Final = "other"
SCRAPE_TIMEOUT_S: Final = 5.0
"""How long a scrape waits for the event loop before it fails (a stuck loop shows)."""
_COUNTS: Final = ("members", "targeted", "updated", "healthy", "unhealthy", "silent", "pending")
_HELP: Final = {
    "incoming_overflow": "Messages the session dropped: QoS 0 beyond its incoming queue",
    "ingest_batches": "Batches of waiting messages the ingest took",
    "ingest_batches_threaded": "Ingest batches long enough to be read in a thread",
    "ingest_messages_threaded": "Messages read in a thread, in those batches",
    "telemetry_counted": "Telemetry summaries counted",
    "telemetry_duplicates": "Telemetry summaries counted before: dropped, acknowledged again",
    "telemetry_early": "Telemetry summaries dropped: an earlier number is missing",
    "telemetry_stale": "Telemetry summaries of a stream the device has left",
    "telemetry_overlaps": "Telemetry summaries overlapping what was counted",
    "telemetry_skipped": "Telemetry numbers lost on the device, never counted",
    "telemetry_unnumbered": "Telemetry summaries of agents before end-to-end delivery",
    "telemetry_commits": "Group commits of the telemetry ledger",
    "telemetry_commit_failures": "Telemetry commits that failed (retried)",
    "acks_published": "Telemetry acknowledgements the broker took",
    "acks_failed": "Telemetry acknowledgements the broker did not take (retried)",
}
"""Help of each count of ``Counters`` exported as ``edgefleet_coordinator_<name>_total``
(``messages_ingested`` and ``messages_dropped`` have their own metrics)."""


@dataclass(frozen=True, kw_only=True)
class Scrape:
    """What one scrape reads of the coordinator, on the event loop."""

    census: Mapping[Census, int]
    rollouts: Iterable[RolloutRecord]
    counters: Counters
    view_age_s: float | None
    view_complete: bool
    connected: bool


def _label(text: str) -> str:
    return bound_text(text, LABEL_CHARS)


def _devices(census: Mapping[Census, int], series: int) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        "edgefleet_devices",
        "Devices the fleet view knows, by class, active release, mode and online state",
        labels=("hw_class", "release", "mode", "online"),
    )
    merged: Counter[tuple[str, str, str, str]] = Counter()
    for (hw_class, release, mode, online), n in census.items():
        merged[_label(hw_class), _label(release), mode, "true" if online else "false"] += n
    ranked = merged.most_common()
    for labels, n in ranked[:series]:
        family.add_metric(labels, n)
    rest = sum(n for _, n in ranked[series:])
    if rest:
        family.add_metric((OTHER, OTHER, OTHER, OTHER), rest)
    return family


def _shown(rollouts: Iterable[RolloutRecord], finished: int) -> list[RolloutRecord]:
    """The live rollouts, and the latest ``finished`` finished ones, by id."""
    records = list(rollouts)
    done = sorted((r for r in records if r.phase.final), key=lambda r: -r.updated_at)
    kept = [r for r in records if not r.phase.final] + done[:finished]
    return sorted(kept, key=lambda r: r.id)


def _rollouts(records: list[RolloutRecord]) -> Iterator[Metric]:
    phase = GaugeMetricFamily(
        "edgefleet_rollout_phase",
        "1 for the phase a rollout is in, 0 for the others",
        labels=("rollout", "phase"),
    )
    wave = GaugeMetricFamily(
        "edgefleet_rollout_wave", "A rollout's current wave (from 0)", labels=("rollout",)
    )
    lane_phase = GaugeMetricFamily(
        "edgefleet_rollout_class_phase",
        "1 for the phase a class of a rollout is in, 0 for the others",
        labels=("rollout", "hw_class", "phase"),
    )
    lane_wave = GaugeMetricFamily(
        "edgefleet_rollout_class_wave",
        "A class's current wave in a rollout (from 0)",
        labels=("rollout", "hw_class"),
    )
    devices = GaugeMetricFamily(
        "edgefleet_rollout_class_devices",
        "The devices of a class's current wave, by how they count",
        labels=("rollout", "hw_class", "count"),
    )
    for record in records:
        rid = _label(record.id)
        for p in Phase:
            phase.add_metric((rid, p.value), float(record.phase is p))
        wave.add_metric((rid,), record.wave)
        for name, lane in record.lanes.items():
            hw_class = _label(name)
            for lp in LanePhase:
                lane_phase.add_metric((rid, hw_class, lp.value), float(lane.phase is lp))
            lane_wave.add_metric((rid, hw_class), lane.wave)
            for count in _COUNTS:
                devices.add_metric((rid, hw_class, count), getattr(lane.counts, count))
    yield from (phase, wave, lane_phase, lane_wave, devices)


def _counters(counters: Counters) -> Iterator[Metric]:
    ingested = CounterMetricFamily(
        "edgefleet_messages_ingested", "Messages the coordinator's ingest took from the broker"
    )
    ingested.add_metric((), counters.messages_ingested)
    refused = CounterMetricFamily(
        "edgefleet_messages_refused",
        "Messages the coordinator refused, by reason",
        labels=("reason",),
    )
    for reason in sorted(REFUSALS):
        refused.add_metric((reason,), counters.refused[reason])
    yield from (ingested, refused)
    for name, value in counters.snapshot().items():
        if name in _HELP:
            yield CounterMetricFamily(f"edgefleet_coordinator_{name}", _HELP[name], value=value)


def _histogram(family: HistogramMetricFamily, store: str, latency: Latency) -> None:
    cumulative = list(itertools.accumulate(latency.counts))
    buckets = [(repr(b), float(n)) for b, n in zip(WRITE_BUCKETS_S, cumulative, strict=False)]
    family.add_metric((store,), [*buckets, ("+Inf", float(cumulative[-1]))], latency.total_s)


def families(scrape: Scrape, config: MetricsConfig) -> list[Metric]:
    """Every metric of one scrape."""
    view_complete = GaugeMetricFamily(
        "edgefleet_fleet_view_complete",
        "1 once the fleet view holds every retained device message of this connection",
        value=float(scrape.view_complete),
    )
    connected = GaugeMetricFamily(
        "edgefleet_coordinator_connected",
        "1 while the coordinator is connected to the broker",
        value=float(scrape.connected),
    )
    writes = HistogramMetricFamily(
        "edgefleet_store_write_seconds",
        "How long the stores' writes took: coordinator (records, audit), telemetry (commits)",
        labels=("store",),
    )
    _histogram(writes, "coordinator", scrape.counters.store_writes)
    _histogram(writes, "telemetry", scrape.counters.telemetry_commit_writes)
    found = [
        _devices(scrape.census, config.device_series),
        *_rollouts(_shown(scrape.rollouts, config.finished_rollouts)),
        *_counters(scrape.counters),
        view_complete,
        connected,
        writes,
    ]
    if scrape.view_age_s is not None:
        found.append(
            GaugeMetricFamily(
                "edgefleet_fleet_view_age_seconds",
                "Seconds since a device's presence, state or health last changed the fleet view",
                value=max(scrape.view_age_s, 0.0),
            )
        )
    return found


class _Collector(Collector):
    """prometheus_client's side: runs on its server's threads, reads on the loop."""

    def __init__(self, core: Core, config: MetricsConfig, loop: asyncio.AbstractEventLoop) -> None:
        self._core = core
        self._config = config
        self._loop = loop

    async def _read(self) -> list[Metric]:
        core = self._core
        changed_at = core.fleet.changed_at
        transport = core.transport
        scrape = Scrape(
            census=core.fleet.census(),
            rollouts=core.rollouts.values(),
            counters=core.counters,
            view_age_s=None if changed_at is None else core.clock() - changed_at,
            view_complete=core.settling.fenced,
            connected=transport is not None and transport.connected,
        )
        return families(scrape, self._config)

    def collect(self) -> Iterable[Metric]:
        """Raises: TimeoutError: the event loop did not answer in ``SCRAPE_TIMEOUT_S``."""
        return asyncio.run_coroutine_threadsafe(self._read(), self._loop).result(SCRAPE_TIMEOUT_S)


class Exporter:
    """Serves ``/metrics`` while entered (an async context manager)."""

    def __init__(self, core: Core, config: MetricsConfig) -> None:
        self._core = core
        self._config = config
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int] | None:
        """The host and port served (the port chosen, for port 0); None when not serving."""
        if self._server is None:
            return None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    async def __aenter__(self) -> Exporter:
        """Raises: OSError: the address cannot be bound (in use, not this machine's)."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self._core, self._config, asyncio.get_running_loop()))
        ProcessCollector(registry=registry)
        config = self._config
        self._server, self._thread = await asyncio.to_thread(
            start_http_server, config.port, config.host, registry
        )
        log.info("coordinator: metrics on http://%s:%d/metrics", *(self.address or ("", 0)))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None and thread is not None:
            # shutdown() waits for the serving loop, which polls twice a second: a thread.
            await asyncio.to_thread(server.shutdown)
            server.server_close()
            await asyncio.to_thread(thread.join)
