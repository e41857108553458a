"""No telemetry lost end to end, against the real broker: the coordinator counts every
inference a real agent made exactly once, after a kill -9 of the broker right after a
burst, after a burst larger than the broker's queue while the coordinator was down, and
across coordinator restarts (the agents send everything unacknowledged again, so a
double count would show as a sum too high)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Final

from broker.config import default_template
from broker.launcher import MosquittoBroker
from edgefleet.fleet import Fleet
from models import DemoModel
from tests.integration.fleetkit import (
    INTEL,
    MakeFleet,
    Wire,
    live,
    restart_idle,
    roll_out,
    run,
    start_agent_with,
)

FAST: Final = {"telemetry_window_s": 0.25, "resend_s": 0.5, "resend_max_s": 2.0}
"""Many small windows, re-sent soon: a burst in a few seconds."""
SMALL_QUEUE: Final = 40
"""The broker's queue for the coordinator in the overflow test: a few seconds' worth."""


async def _installed(fleet: Fleet, tg: asyncio.TaskGroup, wire: Wire, model: DemoModel) -> None:
    """Every agent running (fast windows) and ``model`` installed on them."""
    for device_id in fleet.home.devices():
        start_agent_with(fleet, tg, device_id, **FAST)
    async with fleet.operator() as operator:
        await roll_out(operator, fleet, wire, model, rollout_id="install-v1")


def test_every_window_is_counted_after_the_broker_is_killed_right_after_a_burst(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({INTEL: 2})
    run(_killed(fleet, demo_models["digits-v1"]))


async def _killed(fleet: Fleet, model: DemoModel) -> None:
    devices = list(fleet.home.devices())
    async with live(fleet, agents=()) as tg, Wire.open(fleet.home) as wire:
        await _installed(fleet, tg, wire, model)
        first = fleet.coordinator
        assert first is not None
        await wire.until(lambda: all(first.telemetry.committed(d) for d in devices), what="counts")
        # The burst: the coordinator is away, the broker acknowledges windows into its
        # queue (memory only, saved every 5 s), and dies before saving them.
        await _stop_coordinator(fleet)
        await asyncio.sleep(1.5)
        await asyncio.to_thread(fleet.broker.kill)
        await asyncio.to_thread(fleet.broker.start)
        second = fleet.start_coordinator(tg)
        await _every_inference_counted(fleet, tg, wire, devices)
        assert second.counters.telemetry_overlaps == 0


def test_a_burst_beyond_the_brokers_queue_while_the_coordinator_is_down_loses_nothing(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({INTEL: 2})
    run(_overflow(fleet, demo_models["digits-v1"]))


async def _overflow(fleet: Fleet, model: DemoModel) -> None:
    devices = list(fleet.home.devices())
    async with live(fleet, agents=()) as tg, Wire.open(fleet.home) as wire:
        await _installed(fleet, tg, wire, model)
        await _stop_coordinator(fleet)
        # The same broker (folder, persistence, ports) with a queue of a few seconds.
        await asyncio.to_thread(fleet.broker.stop)
        fleet.broker = MosquittoBroker(
            folder=fleet.broker.folder,
            material=fleet.home.broker_material(),
            ports=fleet.broker.ports,
            template=re.sub(
                r"(?m)^max_queued_messages \d+$",
                f"max_queued_messages {SMALL_QUEUE}",
                default_template(),
            ),
        )
        await asyncio.to_thread(fleet.broker.start)
        await wire.until(
            lambda: "Outgoing messages are being dropped for client" in fleet.broker.log_text(),
            what="the broker to drop messages queued for the coordinator",
        )
        await asyncio.sleep(2.0)  # a burst well past the queue
        back = fleet.start_coordinator(tg)
        await _every_inference_counted(fleet, tg, wire, devices)
        assert back.counters.telemetry_overlaps == 0


async def _stop_coordinator(fleet: Fleet) -> None:
    task = fleet.coordinator_task
    assert task is not None
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _every_inference_counted(
    fleet: Fleet, tg: asyncio.TaskGroup, wire: Wire, devices: list[str]
) -> None:
    """Stop each agent cleanly (its open window committed), start it again on its data
    folder without inferring any more, and wait until the coordinator's stored count of
    every device is exactly what the agent made."""
    made, again = await restart_idle(fleet, tg, devices, **FAST)
    assert all(made[d] > 0 for d in devices)
    coordinator = fleet.coordinator
    assert coordinator is not None

    def counted() -> dict[str, int]:
        marks = {d: coordinator.telemetry.committed(d) for d in devices}
        return {d: 0 if m is None else m.inferences for d, m in marks.items()}

    def expected() -> dict[str, int]:
        return {d: made[d] + again[d].inferences_total for d in devices}

    await wire.until(lambda: counted() == expected(), what="every inference counted")
    # And it stays so: nothing counted twice as the agents' resends keep arriving.
    await asyncio.sleep(1.0)
    assert counted() == expected()
