"""A flapping link on the real broker: every reconnect redelivers the retained trust
and manifest. A manifest the agent rejected once is not reported again on each
redelivery (the outbox would grow with every flap), and the agent serves on."""

from __future__ import annotations

import time

from agent.lifecycle import Stage
from edgefleet.fleet import Fleet
from models import DemoModel
from schemas import OFFLINE, ONLINE, EventKind, Reason, topics
from tests.broker.faults import drop
from tests.integration.fleetkit import (
    JETSON,
    MakeFleet,
    Wire,
    coordinator_session,
    live,
    manifest,
    manifest_key,
    profiles,
    publish_fetchable,
    publish_manifest,
    release_for,
    run,
    sign,
)

FLAPS = 3


def test_rejected_manifest_is_reported_once_across_reconnects(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 1})
    run(_flap(fleet, demo_models["digits-v1"]))


async def _flap(fleet: Fleet, model: DemoModel) -> None:
    (device_id,) = fleet.home.devices()
    v1 = release_for(model, profiles(fleet)[JETSON])
    key = manifest_key(fleet.home)
    async with (
        live(fleet, coordinator=False),
        Wire.open(fleet.home) as wire,
        coordinator_session(fleet.home) as cloud,
    ):
        agent = fleet.agents[device_id]
        await publish_fetchable(cloud, model.path.read_bytes(), name=model.name)
        await cloud.publish(topics.trust(), fleet.home.trust(), retain=True)
        await publish_manifest(cloud, JETSON, sign(manifest(JETSON, 1, v1), key))
        await wire.until(
            lambda: agent.stage is Stage.SERVING and agent.active_release == v1,
            what="v1 served",
        )
        stale = sign(manifest(JETSON, 2, v1, issued_at=time.time() - 7200), key)
        await publish_manifest(cloud, JETSON, stale)

        def rejected() -> list[str | None]:
            """Rejections reported, each once: an event the link cut before its ack came
            back is sent again under its own id (at least once), which is no new report."""
            told = {e.event_id: e for e in wire.events if e.kind is EventKind.MANIFEST_REJECTED}
            return [e.reason for e in told.values()]

        await wire.until(rejected, what="the stale manifest rejected")
        for flap in range(FLAPS):
            session = agent.link.session
            assert session is not None
            states = len([m for m in wire.raw if m.topic.endswith(f"{device_id}/state")])
            drop(session)  # as a network failure: the broker fires the Will
            await wire.until(
                lambda: wire.presence.get(device_id) == OFFLINE, what=f"flap {flap}: offline"
            )
            await wire.until(
                lambda: wire.presence.get(device_id) == ONLINE, what=f"flap {flap}: online"
            )
            # Re-asserted after the retained manifest was redelivered and handled.
            await wire.until(
                lambda states=states: (  # type: ignore[misc]
                    len([m for m in wire.raw if m.topic.endswith(f"{device_id}/state")])
                    > states + 1
                ),
                what=f"flap {flap}: state re-asserted",
            )
        served = agent.inferences_total
        await wire.until(lambda: agent.inferences_total > served + 10, what="inference")
        assert rejected() == [Reason.EXPIRED.value]
        assert agent.applied_seq == 1
        assert agent.active_release == v1
        assert agent.stage is Stage.SERVING
