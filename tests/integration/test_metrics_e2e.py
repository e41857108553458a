"""The coordinator's Prometheus metrics as a scraper reads them: a real coordinator with
real agents on a real Mosquitto serves ``/metrics`` over HTTP, and the text is parsed with
prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.request
from collections.abc import AsyncIterator

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from coordinator import Coordinator
from coordinator.config import MetricsConfig
from edgefleet.fleet import Fleet
from models import DemoModel
from schemas import Phase, encode, topics
from schemas.topics import DeviceChannel
from tests.coordinator.records import device_state
from tests.integration.fleetkit import (
    INTEL,
    JETSON,
    MakeFleet,
    Wire,
    coordinator_session,
    eventually,
    release_id,
    roll_out,
    run,
)

Scraped = dict[str, Metric]


async def _scrape(coordinator: Coordinator) -> Scraped:
    address = coordinator.metrics_address
    assert address is not None
    host, port = address
    url = f"http://{host}:{port}/metrics"

    def get() -> str:
        with urllib.request.urlopen(url, timeout=10) as answer:
            assert answer.status == 200
            assert answer.headers["Content-Type"].startswith("text/plain")
            text: str = answer.read().decode()
            return text

    text = await asyncio.to_thread(get)
    return {family.name: family for family in text_string_to_metric_families(text)}


def _devices(scraped: Scraped) -> dict[tuple[str, str, str, str], float]:
    names = ("hw_class", "release", "mode", "online")
    return {
        tuple(s.labels[n] for n in names): s.value  # type: ignore[misc]
        for s in scraped["edgefleet_devices"].samples
    }


def _value(scraped: Scraped, name: str, sample: str = "", **labels: str) -> float:
    """The value of the sample ``name + sample`` (``_total``, ``_count``) with ``labels``."""
    family = scraped[name]
    found = [s.value for s in family.samples if s.name == name + sample and s.labels == labels]
    assert len(found) == 1, (name, labels, family.samples)
    return found[0]


def _refused(scraped: Scraped, reason: str) -> float:
    return _value(scraped, "edgefleet_messages_refused", "_total", reason=reason)


@contextlib.asynccontextmanager
async def _running(fleet: Fleet) -> AsyncIterator[Coordinator]:
    """The coordinator serving metrics on a free port, and every agent."""
    async with asyncio.TaskGroup() as tg:
        coordinator = fleet.start_coordinator(tg, metrics=MetricsConfig(port=0))
        for device_id in fleet.home.devices():
            fleet.start_agent(tg, device_id)
        try:
            yield coordinator
        finally:
            for task in [*fleet.agent_tasks.values(), fleet.coordinator_task]:
                if task is not None:
                    task.cancel()


def test_a_scrape_shows_the_fleet_the_rollout_the_refusals_and_the_store(
    make_fleet: MakeFleet, demo_models: dict[str, DemoModel]
) -> None:
    fleet = make_fleet({JETSON: 2, INTEL: 1})
    model = demo_models["digits-v1"]
    released = release_id(model)

    async def scenario() -> Scraped:
        async with _running(fleet) as coordinator, Wire.open(fleet.home) as wire:
            async with fleet.operator() as operator:
                await roll_out(operator, fleet, wire, model, rollout_id="first")
            async with coordinator_session(fleet.home) as cloud:
                junk = topics.device("jetson-000", DeviceChannel.HEALTH)
                await cloud.publish(junk, b"\xc1 not msgpack", retain=False)
                other = device_state("intel-000", hw_class=INTEL, updated_at=time.time())
                await cloud.publish(topics.device("jetson-001", DeviceChannel.STATE), encode(other))

            async def settled() -> Scraped | None:
                scraped = await _scrape(coordinator)
                # States settle a second or two after the health reports that end the
                # rollout: every device serving the release, online, and only them.
                serving = _devices(scraped) == {
                    (JETSON, released, "serving", "true"): 2,
                    (INTEL, released, "serving", "true"): 1,
                }
                refused = _refused(scraped, "wrong_device") + _refused(scraped, "malformed")
                return scraped if serving and refused >= 2 else None

            return await eventually(settled, what="every device serving, refusals counted")

    scraped = run(scenario())

    phase = "edgefleet_rollout_phase"
    assert _value(scraped, phase, rollout="first", phase=Phase.COMPLETED.value) == 1
    assert _value(scraped, phase, rollout="first", phase=Phase.WAVE.value) == 0
    for hw_class in (JETSON, INTEL):
        lane = {"rollout": "first", "hw_class": hw_class}
        assert _value(scraped, "edgefleet_rollout_class_phase", phase="completed", **lane) == 1
        assert _value(scraped, "edgefleet_rollout_class_wave", **lane) == 0  # its one wave
        healthy = _value(scraped, "edgefleet_rollout_class_devices", count="healthy", **lane)
        assert healthy >= 1

    assert _refused(scraped, "malformed") >= 1
    assert _refused(scraped, "wrong_device") >= 1
    assert _value(scraped, "edgefleet_messages_ingested", "_total") > 0
    assert _value(scraped, "edgefleet_coordinator_telemetry_counted", "_total") > 0
    assert _value(scraped, "edgefleet_coordinator_connected") == 1
    assert _value(scraped, "edgefleet_fleet_view_complete") == 1
    assert _value(scraped, "edgefleet_fleet_view_age_seconds") >= 0
    for store in ("coordinator", "telemetry"):
        assert _value(scraped, "edgefleet_store_write_seconds", "_count", store=store) > 0
    assert "process_cpu_seconds" in scraped
