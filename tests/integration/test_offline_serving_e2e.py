"""An agent keeps serving while the broker is down, queues its telemetry durably,
delivers every queued window once the broker is back, and forgets them only once the
coordinator's ack covers them."""

from __future__ import annotations

import asyncio

from agent.lifecycle import Stage
from edgefleet.fleet import Fleet
from models import DemoModel
from schemas import TelemetryAck, TelemetrySummary, decode, encode, topics
from tests.integration.fleetkit import (
    INTEL,
    MakeFleet,
    Wire,
    coordinator_session,
    eventually,
    live,
    manifest,
    manifest_key,
    outbox_rows,
    profiles,
    publish_fetchable,
    publish_manifest,
    release_for,
    run,
    sign,
)


def test_agent_serves_offline_and_flushes_its_outbox(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({INTEL: 1})
    run(_offline(fleet, demo_models["digits-v1"]))


async def _offline(fleet: Fleet, model: DemoModel) -> None:
    (device_id,) = fleet.home.devices()
    v1 = release_for(model, profiles(fleet)[INTEL])
    outbox = fleet.workdir / "agents" / device_id / "outbox.sqlite"
    # A persistent session: what the agent sends while the watcher is still
    # reconnecting after the broker restart waits for it in the broker.
    async with (
        live(fleet, coordinator=False),
        Wire.open(fleet.home, persistent=True) as wire,
    ):
        agent = fleet.agents[device_id]
        async with coordinator_session(fleet.home) as cloud:
            await publish_fetchable(cloud, model.path.read_bytes(), name=model.name)
            await cloud.publish(topics.trust(), fleet.home.trust(), retain=True)
            signed = sign(manifest(INTEL, 1, v1), manifest_key(fleet.home))
            await publish_manifest(cloud, INTEL, signed)
        await wire.until(
            lambda: agent.stage is Stage.SERVING and agent.active_release == v1,
            what="v1 installed",
        )
        await wire.until(
            lambda: any(s.device_id == device_id for s in wire.telemetry.values()),
            what="telemetry flowing",
        )

        await asyncio.to_thread(fleet.broker.stop)
        served = agent.inferences_total

        def queued() -> dict[str, TelemetrySummary]:
            return {
                s.summary_id: s
                for s in (
                    decode(payload, TelemetrySummary)
                    for _, kind, payload in outbox_rows(outbox)
                    if kind == "telemetry"
                )
            }

        waiting: dict[str, TelemetrySummary] = {}

        async def accumulate() -> dict[str, TelemetrySummary] | None:
            waiting.update(await asyncio.to_thread(queued))
            return waiting if len(waiting) >= 3 else None

        await eventually(accumulate, what="three telemetry windows queued offline")
        # Serving on, on the model it has, with no broker at all.
        assert agent.inferences_total > served
        assert agent.stage is Stage.SERVING
        assert agent.active_release == v1
        assert not fleet.broker.running
        queued_before_restart = await asyncio.to_thread(queued)
        assert len(queued_before_restart) >= 3
        assert all(s.device_id == device_id for s in queued_before_restart.values())

        await asyncio.to_thread(fleet.broker.start)

        # Every queued window arrives, with its count intact, and leaves the outbox.
        await wire.until(
            lambda: set(queued_before_restart) <= set(wire.telemetry),
            what="every queued telemetry window to arrive",
        )
        sent = sum(s.count for s in queued_before_restart.values())
        received = sum(wire.telemetry[i].count for i in queued_before_restart)
        assert sent > 0
        assert received == sent
        assert all(wire.telemetry[i].device_id == device_id for i in queued_before_restart)

        # A PUBACK is not enough: they leave the outbox once the coordinator's ack (sent
        # by hand here, retained as the coordinator does) covers them.
        await asyncio.sleep(0.5)
        assert set(queued_before_restart) <= set(await asyncio.to_thread(queued))
        last = max(queued_before_restart.values(), key=lambda s: s.last_seq or 0)
        assert last.stream is not None
        assert last.last_seq is not None
        ack = TelemetryAck(device_id=device_id, stream=last.stream, seq=last.last_seq, at=0.0)
        async with coordinator_session(fleet.home) as cloud:
            await cloud.publish(topics.device_ack(device_id), encode(ack), retain=True)

        async def drained() -> bool:
            return not set(queued_before_restart) & set(await asyncio.to_thread(queued))

        await eventually(drained, what="the acknowledged windows to leave the outbox")
        assert agent.active_release == v1
