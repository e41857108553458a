"""A device whose accelerator fails, over the real broker: its model falls back to the
CPU, it still passes its soak and serves, and its retained state says it is degraded
and why, for the coordinator, the operator's `fleet ls` and the dashboards."""

from __future__ import annotations

import onnxruntime as ort

from coordinator.operator import read_fleet
from edgefleet.fleet import Fleet
from edgefleet.viewcli import watcher
from models import DemoModel
from schemas import Mode
from tests.integration.fleetkit import (
    JETSON,
    MakeFleet,
    Wire,
    live,
    release_id,
    roll_out,
    run,
    start_agent_with,
)

MISSING = next(p for p in ort.get_all_providers() if p not in ort.get_available_providers())


def test_a_device_whose_accelerator_fails_serves_degraded_and_its_state_says_why(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 2})
    run(_accelerator_fails(fleet, demo_models["digits-v1"]))


async def _accelerator_fails(fleet: Fleet, v1: DemoModel) -> None:
    broken, fine = sorted(fleet.home.devices())
    async with live(fleet, agents=[fine]) as tg, Wire.open(fleet.home) as wire:
        # The device's accelerator is asked for first, and is not there.
        start_agent_with(fleet, tg, broken, providers=(MISSING, "CPUExecutionProvider"))
        async with fleet.operator() as operator:
            final = await roll_out(
                operator, fleet, wire, v1, rollout_id="install", classes=(JETSON,)
            )
        assert final.lanes[JETSON].counts.healthy == 2, "degraded, yet healthy: it serves"

        def settled() -> bool:
            return all(
                (s := wire.states.get(d)) is not None
                and s.active_release == release_id(v1)
                and s.mode is not Mode.UPDATING
                for d in (broken, fine)
            )

        await wire.until(settled, what="both devices done updating to v1")
        state = wire.states[broken]
        assert state.mode is Mode.DEGRADED
        assert state.degraded_reason is not None
        assert state.degraded_reason.startswith(f"provider: {MISSING}: not in this onnxruntime")
        assert state.degraded_reason.endswith("serving on CPUExecutionProvider")
        assert (wire.states[fine].mode, wire.states[fine].degraded_reason) == (Mode.SERVING, None)
        # What `edgefleet fleet ls` shows, with the read-only watcher account.
        async with watcher(fleet.home) as session:
            rows = {row.device_id: row for row in await read_fleet(session)}
        assert (rows[broken].mode, rows[broken].degraded_reason) == (
            "degraded",
            state.degraded_reason,
        )
        assert rows[fine].degraded_reason is None
