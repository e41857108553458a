"""Simulated devices (``edgefleet.sim``) against the real broker and coordinator: a
rollout in two waves runs to completion on them, and a share of unhealthy ones rolls a
rollout back, as it would with real agents."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgefleet.cli import main
from edgefleet.fleet import Fleet
from edgefleet.sim import Behaviour, Observer, SimConfig, Simulator
from edgefleet.simcli import enroll_sim_devices
from models import DemoModel
from schemas import ONLINE, HealthReport, Mode, Phase, RolloutStatus, Verdict
from tests.integration.fleetkit import JETSON, MakeFleet, Wire, live, release_id, roll_out, run

DEVICES = 20
SOAK_S = 0.2


class _Seen(Observer):
    """What the simulator's observer was told."""

    def __init__(self) -> None:
        self.took: dict[int, set[str]] = {}
        self.reports: list[HealthReport] = []

    def verified(self, device_id: str, seq: int) -> None:
        self.took.setdefault(seq, set()).add(device_id)

    def reporting(self, device_id: str, report: HealthReport) -> None:
        assert report.device_id == device_id
        self.reports.append(report)


def _sim_fleet(make_fleet: MakeFleet) -> tuple[Fleet, list[Path]]:
    fleet = make_fleet({JETSON: 0})
    folders = enroll_sim_devices(fleet.home, JETSON, DEVICES, prefix="sim")
    material = fleet.home.broker_material()
    fleet.broker.reload(acl=material.acl)
    return fleet, folders


@contextlib.asynccontextmanager
async def _running(sim: Simulator) -> AsyncIterator[None]:
    task = asyncio.create_task(sim.run())
    try:
        async with asyncio.timeout(60):
            await sim.until_connected()
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _after_report(wire: Wire, device_id: str) -> bool:
    state = wire.states.get(device_id)
    return state is not None and state.updated_at >= wire.health[device_id].at


def _settled(wire: Wire, ids: set[str]) -> bool:
    """Every device reported and its state says so."""
    states = [wire.states.get(d) for d in ids]
    return ids <= set(wire.health) and all(
        s is not None and s.mode is not Mode.UPDATING for s in states
    )


async def _roll(
    fleet: Fleet, sim: Simulator, model: DemoModel, *, waves: tuple[float, ...], expect: Phase
) -> tuple[RolloutStatus, Wire, dict[str, bytes]]:
    async with (
        live(fleet, agents=()),
        Wire.open(fleet.home) as wire,
        _running(sim),
        fleet.operator() as operator,
    ):
        final = await roll_out(
            operator, fleet, wire, model, rollout_id="sim-rollout", waves=waves, expect=expect
        )
        ids = {device.device_id for device in sim.devices}
        # The devices' last words reach the wire after the status that ended the rollout:
        # the report, then (after the settle) a state made after it.
        await wire.until(
            lambda: ids <= set(wire.health) and all(_after_report(wire, d) for d in ids),
            what="every device's report and the state after it",
        )
        # Seen before the simulator stops: its devices then say offline, as they should.
        running = dict(wire.presence)
    return final, wire, running


def test_simulated_fleet_takes_a_rollout_to_completion(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet, folders = _sim_fleet(make_fleet)
    seen = _Seen()
    sim = Simulator(folders, SimConfig(soak_s=SOAK_S), observer=seen)
    model = demo_models["digits-v1"]
    final, wire, running = run(
        _roll(fleet, sim, model, waves=(50.0, 100.0), expect=Phase.COMPLETED)
    )

    ids = {device.device_id for device in sim.devices}
    assert final.counts.targeted == final.counts.healthy == DEVICES
    # Every manifest of the rollout (two waves, then the promotion) reached and was
    # verified by every device, and none was refused.
    assert len(seen.took) >= 3
    assert all(took == ids for took in seen.took.values())
    assert sim.stats.refused == 0
    # One healthy report per device on the candidate, under the rollout, as the
    # coordinator counted them.
    assert sorted(r.device_id for r in seen.reports) == sorted(ids)
    candidate = release_id(model)
    assert {(r.release, r.rollout_id, r.verdict) for r in seen.reports} == {
        (candidate, "sim-rollout", Verdict.HEALTHY)
    }
    for device_id in ids:
        assert running[device_id] == ONLINE
        assert wire.states[device_id].active_release == candidate
        assert wire.states[device_id].mode is Mode.SERVING
        assert wire.health[device_id].verdict is Verdict.HEALTHY


def test_unhealthy_simulated_devices_roll_a_rollout_back(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet, folders = _sim_fleet(make_fleet)
    sim = Simulator(folders, SimConfig(soak_s=SOAK_S, unhealthy_fraction=0.25))
    unhealthy = {d.device_id for d in sim.devices if d.behaviour is Behaviour.UNHEALTHY}
    assert 0 < len(unhealthy) < DEVICES, "the share picked no device, or all of them"
    final, wire, _ = run(
        _roll(fleet, sim, demo_models["digits-v1"], waves=(100.0,), expect=Phase.ROLLED_BACK)
    )

    assert final.counts.unhealthy >= 1
    assert final.reason is not None
    assert any(device_id in final.reason for device_id in unhealthy)
    for device_id in unhealthy:
        # Back on what it ran before (nothing: a first install), saying why.
        assert wire.states[device_id].active_release is None
        assert wire.states[device_id].mode is Mode.DEGRADED
        assert wire.health[device_id].verdict is Verdict.UNHEALTHY


def test_sim_command_runs_enrolled_devices_and_reports(
    make_fleet: MakeFleet, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet, folders = _sim_fleet(make_fleet)
    home = str(fleet.home.root)
    profiles = str(fleet.workdir / "profiles.toml")
    argv = ["--home", home, "sim", "--class", JETSON, "--devices", str(DEVICES)]
    argv += ["--classes", profiles, "--duration", "3", "--report", "3", "--telemetry", "0.5"]
    assert main(argv) == 0

    out = capsys.readouterr().out
    # The devices were enrolled before: none is added, every one connected and sent
    # telemetry windows while it ran.
    assert sorted(fleet.home.devices()) == sorted(f.name for f in folders)
    status = out.strip().splitlines()[-1]
    assert f"connected {DEVICES}," in status
    sent = int(status.rsplit("telemetry ", 1)[1])
    assert sent >= DEVICES
