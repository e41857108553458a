"""A burst through the real coordinator over a real Mosquitto: the retained presence,
state and health of hundreds of devices (and one device's junk) arrive at once when the
coordinator connects; its ingest takes them in batches read off the event loop, applies
every good one and drops only the junk."""

from __future__ import annotations

import asyncio
import time

from coordinator import Coordinator
from edgefleet.fleet import Fleet
from schemas import ONLINE, encode, topics
from schemas.topics import DeviceChannel
from tests.coordinator.records import device_state, health_report
from tests.integration.fleetkit import (
    JETSON,
    MakeFleet,
    coordinator_session,
    eventually,
    live,
    run,
)

DEVICES = 300


def _state(device_id: str) -> bytes:
    return encode(device_state(device_id, hw_class=JETSON, applied_seq=0, updated_at=time.time()))


def _health(device_id: str) -> bytes:
    return encode(health_report(device_id, manifest_seq=1, at=time.time()))


def test_a_burst_of_retained_device_messages_is_read_in_batches_off_the_loop(
    make_fleet: MakeFleet,
) -> None:
    fleet = make_fleet({JETSON: 1})
    coordinator = run(_burst(fleet))
    views = coordinator.fleet.devices
    assert sum(v.state is not None for v in views.values()) == DEVICES
    assert sum(v.health is not None for v in views.values()) == DEVICES
    assert "sim-junk" not in views or views["sim-junk"].state is None
    counters = coordinator.counters
    assert counters.messages_dropped == 1
    assert counters.ingest_batches_threaded >= 1
    assert counters.ingest_messages_threaded >= counters.ingest_batches_threaded * 16


async def _burst(fleet: Fleet) -> Coordinator:
    async with coordinator_session(fleet.home) as cloud:
        for device_id in (f"sim-{i:04d}" for i in range(DEVICES)):
            await asyncio.gather(
                *(
                    cloud.publish(topics.device(device_id, channel), payload, retain=True)
                    for channel, payload in (
                        (DeviceChannel.PRESENCE, ONLINE),
                        (DeviceChannel.STATE, _state(device_id)),
                        (DeviceChannel.HEALTH, _health(device_id)),
                    )
                )
            )
        junk = topics.device("sim-junk", DeviceChannel.STATE)
        await cloud.publish(junk, b"\xc1 not msgpack", retain=True)
    async with live(fleet, agents=()):
        coordinator = fleet.coordinator
        assert coordinator is not None

        async def complete() -> bool:
            views = coordinator.fleet.devices.values()
            healthy = sum(v.health is not None for v in views)
            return healthy == DEVICES and coordinator.counters.messages_dropped > 0

        await eventually(complete, what="every device's health and the junk", timeout=60)
    return coordinator
