"""Client-id takeover against a live fleet: with the dashboard account (WebSockets), the
operator account (services listener) or a device certificate (mTLS), asking for the
client id ``coordinator`` or another device's id displaces no one. The running
coordinator and agents keep their connection, and their presence never reads offline."""

from __future__ import annotations

import asyncio

from broker.session import Endpoint, Session
from edgefleet.fleet import Fleet
from edgefleet.home import DASHBOARD, OPERATOR
from schemas import topics
from schemas.topics import DeviceChannel
from tests.integration.fleetkit import JETSON, MakeFleet, Wire, live, run
from tests.integration.test_device_acl_e2e import _device_endpoint


def test_no_listener_or_account_can_displace_the_coordinator_or_a_device(
    make_fleet: MakeFleet,
) -> None:
    fleet = make_fleet({JETSON: 2})
    run(_intrude(fleet))


async def _intrude(fleet: Fleet) -> None:
    victim, intruder_device = sorted(fleet.home.devices())
    presence = (topics.coordinator_presence(), topics.all_devices(DeviceChannel.PRESENCE))
    intruders: dict[str, Endpoint] = {
        "dashboard": fleet.home.service_endpoint(DASHBOARD),
        "operator": fleet.home.service_endpoint(OPERATOR),
        "device certificate": _device_endpoint(fleet, intruder_device),
    }
    # The intruding certificate's own agent is not running: a second login of one
    # identity does replace the first, by design (its key is its identity).
    async with live(fleet, agents=(victim,)), Wire.open(fleet.home, filters=presence) as wire:
        coordinator_presence = topics.coordinator_presence()
        victim_presence = topics.device(victim, DeviceChannel.PRESENCE)

        def payloads(topic: str) -> list[bytes]:
            return [m.payload for m in wire.raw if m.topic == topic]

        await wire.until(
            lambda: (
                payloads(coordinator_presence)[-1:] == [b"online"]
                and payloads(victim_presence)[-1:] == [b"online"]
            ),
            what="coordinator and device online",
        )
        coordinator = fleet.coordinator
        assert coordinator is not None
        agent = fleet.agents[victim]
        sessions = (coordinator.transport, agent.link.session)
        for what, endpoint in intruders.items():
            for stolen in ("coordinator", victim):
                async with Session(endpoint, client_id=stolen) as intruder:
                    # Held across a broker round trip of its own.
                    await intruder.subscribe(topics.trust())
                    await asyncio.sleep(0.3)
                    assert intruder.connected, f"{what} as {stolen}"
        await asyncio.sleep(0.5)  # a displaced owner's Will would be on the wire by now
        assert b"offline" not in payloads(coordinator_presence)
        assert b"offline" not in payloads(victim_presence)
        # The very same connections, never re-established.
        assert (coordinator.transport, agent.link.session) == sessions
        assert all(s is not None and s.connected and s.generation == 1 for s in sessions)
