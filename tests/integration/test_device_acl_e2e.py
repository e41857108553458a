"""A device's certificate (from the home's real enrollment bundle) cannot write a
manifest, the trust document, rollout topics, another device's topics or a telemetry
acknowledgement (its own included): the broker
answers 0x87 and nothing reaches a subscriber."""

from __future__ import annotations

import pytest

from agent import Bundle
from broker.session import Endpoint, PublishRefused, Session
from edgefleet.fleet import Fleet
from schemas import topics
from schemas.topics import DeviceChannel
from tests.integration.fleetkit import JETSON, MakeFleet, Wire, run

NOT_AUTHORIZED = 0x87


def test_device_cert_cannot_write_cloud_or_other_devices_topics(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({JETSON: 2})
    run(_acl(fleet))


def _device_endpoint(fleet: Fleet, device_id: str) -> Endpoint:
    folder = fleet.home.root / "devices" / device_id
    bundle = Bundle.load(folder)
    return Endpoint(
        host=bundle.broker_host,
        port=bundle.broker_port,
        ca_file=folder / bundle.ca_file,
        cert_file=folder / bundle.cert_file,
        key_file=folder / bundle.key_file,
    )


async def _acl(fleet: Fleet) -> None:
    device, other = sorted(fleet.home.devices())
    sha = "ab" * 32
    forbidden = [
        topics.class_manifest(JETSON),
        topics.trust(),
        topics.rollout_spec("evil"),
        topics.rollout_status("evil"),
        topics.artifact_meta(sha),
        topics.coordinator_presence(),
        topics.coordinator_fence(),
        *(topics.device(other, channel) for channel in DeviceChannel),
        topics.device_ack(device),  # only the coordinator acknowledges telemetry
        topics.device_ack(other),
    ]
    own = topics.device(device, DeviceChannel.EVENTS)
    async with (
        Wire.open(fleet.home, filters=(f"{topics.PREFIX}/#",)) as wire,
        Session(_device_endpoint(fleet, device), client_id=device) as session,
    ):
        for topic in forbidden:
            for retain in (True, False):
                with pytest.raises(PublishRefused) as refused:
                    await session.publish(topic, b"forged by " + device.encode(), retain=retain)
                assert refused.value.reason_code == NOT_AUTHORIZED, topic

        # A barrier: the broker delivers a client's messages in order, so once this
        # permitted one arrives, anything published before it would have too.
        await session.publish(own, b"barrier", qos=1)
        await wire.until(
            lambda: any(m.topic == own for m in wire.raw), what="the device's own event"
        )
        leaked = [m.topic for m in wire.raw if m.topic in forbidden]
        assert leaked == []
        assert not [m for m in wire.raw if m.payload.startswith(b"forged by")]
