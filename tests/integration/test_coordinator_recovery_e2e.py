"""The coordinator recovering on a real broker: a broker that lost every retained
message, a broker that is not up yet when the coordinator starts (and credentials it
refuses), and a coordinator that was down longer than a wave may last."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from broker.backoff import Backoff
from broker.session import ConnectRefused
from coordinator import Coordinator
from coordinator.operator import publish_artifact
from edgefleet.runner import Fleet, coordinator_config
from models import DemoModel
from schemas import ONLINE, Desired, Phase, topics
from tests.broker.faults import restart
from tests.integration.fleetkit import (
    JETSON,
    MakeFleet,
    Wire,
    eventually,
    live,
    publish_spec,
    run,
    spec_for,
    stop_coordinator,
    wipe_broker,
)


def test_coordinator_reasserts_artifacts_and_specs_a_wiped_broker_lost(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 1})
    run(_wiped(fleet, demo_models["digits-v2"]))


async def _wiped(fleet: Fleet, v2: DemoModel) -> None:
    data = v2.path.read_bytes()
    stored = fleet.workdir / "coordinator" / "artifacts" / f"{v2.sha256}.onnx"
    async with live(fleet, agents=()):
        async with fleet.operator() as operator:
            meta = await publish_artifact(operator, data, name=v2.name, chunk_size=4096)
            spec = spec_for(v2, rollout_id="r", classes=(JETSON,))
            spec_bytes = await publish_spec(operator, fleet.home, spec)
        async with Wire.open(fleet.home) as wire:
            await wire.until(
                lambda: (s := wire.statuses.get("r")) and s[-1].phase is Phase.WAVE,
                what="r admitted",
            )
        assert stored.read_bytes() == data

        await asyncio.to_thread(wipe_broker, fleet)

        filters = (topics.artifact_chunks(v2.sha256), topics.all_rollout_specs())
        n = len(meta.chunks)

        def everything(wire: Wire, *, retained: bool) -> dict[str, bytes] | None:
            seen = {m.topic: m.payload for m in wire.raw if m.retain or not retained}
            return seen if len(seen) >= n + 2 else None

        # Wait for the re-assert, then read the tree afresh: all of it is retained again.
        async with Wire.open(fleet.home, filters=filters) as wire:
            await wire.until(lambda: everything(wire, retained=False), what="the re-assert")
        async with Wire.open(fleet.home, filters=filters) as wire:
            seen = await wire.until(
                lambda: everything(wire, retained=True), what="artifact and spec retained"
            )
        assert seen[topics.rollout_spec("r")] == spec_bytes
        chunks = [seen[topics.artifact_chunk(v2.sha256, i)] for i in range(n)]
        assert b"".join(chunks) == data  # cut as the operator cut it (4 KiB chunks)
        assert topics.artifact_meta(v2.sha256) in seen

        # Aborted, the candidate is named by no manifest: the coordinator forgets it.
        async with fleet.operator() as operator, Wire.open(fleet.home) as wire:
            abort = spec.model_copy(update={"generation": 2, "desired": Desired.ABORTED})
            await publish_spec(operator, fleet.home, abort)
            await wire.until(lambda: wire.final_status("r"), what="r rolled back")
        await eventually(_gone(stored), what="the aborted candidate's copy deleted")


def test_broker_restart_that_kept_its_retained_artifacts_is_not_sent_them_again(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 1})
    run(_restarted(fleet, demo_models["digits-v2"]))


async def _restarted(fleet: Fleet, v2: DemoModel) -> None:
    async with live(fleet, agents=()):
        async with fleet.operator() as operator:
            meta = await publish_artifact(
                operator, v2.path.read_bytes(), name=v2.name, chunk_size=4096
            )
            spec = spec_for(v2, rollout_id="r", classes=(JETSON,))
            await publish_spec(operator, fleet.home, spec)
        async with Wire.open(fleet.home) as wire:
            await wire.until(
                lambda: (s := wire.statuses.get("r")) and s[-1].phase is Phase.WAVE,
                what="r admitted",
            )
        filters = (topics.artifact_chunks(v2.sha256), topics.coordinator_presence())
        # Persistent: what the coordinator sends while the watcher reconnects waits for it.
        async with Wire.open(fleet.home, filters=filters, persistent=True) as wire:
            retained = len(meta.chunks) + 2  # chunks, meta, presence
            await wire.until(lambda: len(wire.raw) >= retained, what="the retained artifact")
            wire.raw.clear()
            # A clean stop saves the broker's state: retained artifacts survive it.
            await asyncio.to_thread(restart, fleet.broker)

            def presence_reasserted() -> bool:
                return any(
                    m.topic == topics.coordinator_presence()
                    and not m.retain
                    and m.payload == ONLINE
                    for m in wire.raw
                )

            await wire.until(presence_reasserted, what="the coordinator's re-assert")
            await asyncio.sleep(3.0)  # time to compare the retained artifact with its copy
        resent = [
            m.topic for m in wire.raw if m.topic.startswith("fleet/v1/artifacts/") and not m.retain
        ]
        assert resent == []


def _gone(path: Path) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        return not await asyncio.to_thread(path.exists)

    return probe


def test_coordinator_waits_for_a_broker_that_is_not_up_yet(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({JETSON: 1})
    run(_late_broker(fleet))


async def _late_broker(fleet: Fleet) -> None:
    await asyncio.to_thread(fleet.broker.stop)
    async with live(fleet, coordinator=False, agents=()) as tg:
        fleet.start_coordinator(tg, reconnect=Backoff(initial=0.2))
        await asyncio.sleep(2.0)
        assert fleet.coordinator_task is not None
        assert not fleet.coordinator_task.done()
        await asyncio.to_thread(fleet.broker.start)
        async with Wire.open(fleet.home, filters=(topics.coordinator_presence(),)) as wire:
            await wire.until(
                lambda: any(m.payload == ONLINE for m in wire.raw),
                what="the coordinator online",
                timeout=30.0,
            )


def test_coordinator_refused_by_the_broker_fails_loudly(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({JETSON: 1})
    config = coordinator_config(fleet.home, fleet.workdir / "coordinator", fleet.profiles)
    wrong = dataclasses.replace(config.endpoint, password="not-the-password")
    coordinator = Coordinator(dataclasses.replace(config, endpoint=wrong))

    async def go() -> None:
        async with asyncio.timeout(30.0):
            await coordinator.run()

    with pytest.raises(ConnectRefused):
        run(go())


def test_downtime_does_not_count_against_a_wave(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 1})
    run(_downtime(fleet, demo_models["digits-v2"]))


async def _downtime(fleet: Fleet, v2: DemoModel) -> None:
    timeout_s = 4.0
    async with (
        live(fleet, coordinator=False, agents=()) as tg,
        Wire.open(fleet.home) as wire,
        fleet.operator() as operator,
    ):
        fleet.start_coordinator(tg, heartbeat_s=0.5)
        await publish_artifact(operator, v2.path.read_bytes(), name=v2.name)
        # No device ever comes: the single wave can only time out.
        spec = spec_for(v2, rollout_id="r", classes=(JETSON,), wave_timeout_s=timeout_s)
        await publish_spec(operator, fleet.home, spec)
        await wire.until(
            lambda: (s := wire.statuses.get("r")) and s[-1].phase is Phase.WAVE,
            what="r admitted",
        )
        await stop_coordinator(fleet)
        await asyncio.sleep(timeout_s + 2.0)  # down longer than the wave may last

        restarted = time.monotonic()
        fleet.start_coordinator(tg, heartbeat_s=0.5)
        await asyncio.sleep(2.5)
        assert wire.final_status("r") is None, "the downtime counted against the wave"
        final = await wire.until(lambda: wire.final_status("r"), what="r to time out")
        assert final.phase is Phase.ROLLED_BACK
        assert "timed out" in (final.reason or ""), final.reason
        # It ran out of the time it had left, not of the downtime too.
        assert time.monotonic() - restarted >= 2.5
