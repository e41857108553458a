"""The fleet view counts as complete only once the broker's retained device topics were
all read: a broker already holding hundreds of devices' presence and state, a
coordinator that handles them slowly (longer than the fixed 2 s it once waited), and the
fence still comes back only after the last of them."""

from __future__ import annotations

import asyncio
import time

import pytest

from broker.session import Session
from coordinator.clock import Settling
from coordinator.fleet import FleetView
from edgefleet.fleet import Fleet
from schemas import ONLINE, DeviceState, encode, topics
from schemas.topics import DeviceChannel
from tests.coordinator.records import device_state
from tests.integration.fleetkit import (
    ADMIN_ACCOUNTS,
    JETSON,
    MakeFleet,
    coordinator_session,
    live,
    run,
)

DEVICES = 300
HANDLING_S = 0.01
"""Added to every state the coordinator handles: 300 of them take 3 s."""


def _state(device_id: str) -> DeviceState:
    return device_state(device_id, hw_class=JETSON, applied_seq=0, updated_at=time.time())


def test_the_view_is_known_only_after_every_retained_device_message(
    make_fleet: MakeFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = make_fleet({JETSON: 1})
    seen_at_fence: list[tuple[int, int]] = []
    """(devices with a state, devices online) each time a fence settled the view."""
    settled_once = asyncio.Event()

    came_back = Settling.came_back
    on_state = FleetView.on_state

    def slow_state(self: FleetView, state: DeviceState) -> None:
        time.sleep(HANDLING_S)  # blocks the loop that also carries the fence
        on_state(self, state)

    def watched(self: Settling, payload: bytes) -> bool:
        settled = came_back(self, payload)
        if settled:
            coordinator = fleet.coordinator
            assert coordinator is not None
            views = coordinator.fleet.devices.values()
            states = sum(v.state is not None for v in views)
            seen_at_fence.append((states, sum(v.online for v in views)))
            settled_once.set()
        return settled

    monkeypatch.setattr(FleetView, "on_state", slow_state)
    monkeypatch.setattr(Settling, "came_back", watched)
    run(_prefilled(fleet, settled_once))
    assert seen_at_fence[0] == (DEVICES, DEVICES)


async def _prefill(fleet: Fleet) -> None:
    """Retained presence and state of ``DEVICES`` devices."""
    async with coordinator_session(fleet.home) as cloud:
        for device_id in (f"sim-{i:04d}" for i in range(DEVICES)):
            await asyncio.gather(
                cloud.publish(
                    topics.device(device_id, DeviceChannel.PRESENCE), ONLINE, retain=True
                ),
                cloud.publish(
                    topics.device(device_id, DeviceChannel.STATE),
                    encode(_state(device_id)),
                    retain=True,
                ),
            )


async def _prefilled(fleet: Fleet, settled_once: asyncio.Event) -> None:
    await _prefill(fleet)
    started = time.monotonic()
    async with live(fleet, agents=()):
        async with asyncio.timeout(60):
            await settled_once.wait()
    # The slow handling outlasted the fixed settle time the view once relied on.
    assert time.monotonic() - started > DEVICES * HANDLING_S


def test_mosquitto_sends_a_fence_after_the_retained_messages_of_earlier_subscriptions(
    make_fleet: MakeFleet,
) -> None:
    """What the fence relies on, with the broker's queue in play: a Receive Maximum of 20
    makes Mosquitto hold back most of the 600 retained messages, and the fence still
    comes after every one of them. (A QoS 0 fence would not: it overtakes the QoS 1
    messages held back.)"""
    fleet = make_fleet({JETSON: 1})
    run(_order(fleet))


async def _order(fleet: Fleet) -> None:
    await _prefill(fleet)
    account = ADMIN_ACCOUNTS[1]
    endpoint = fleet.home.service_endpoint(account)
    async with Session(endpoint, client_id=account, incoming_limit=20) as session:
        await session.subscribe(
            *(topics.all_devices(c) for c in DeviceChannel), topics.coordinator_fence()
        )
        await session.publish(topics.coordinator_fence(), b"fence", retain=False)
        retained = 0
        async with asyncio.timeout(30):
            async for message in session.messages():
                if message.topic == topics.coordinator_fence():
                    break
                retained += message.retain
    assert retained == 2 * DEVICES
