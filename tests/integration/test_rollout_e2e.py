"""A rollout through a live fleet: first install, then digits-v2 wave by wave."""

from __future__ import annotations

from edgefleet.fleet import Fleet
from models import DemoModel
from schemas import Phase
from tests.integration.fleetkit import (
    INTEL,
    JETSON,
    WAVES,
    MakeFleet,
    PromotionCheck,
    Wire,
    audit_log,
    canaries_of,
    check_wave_manifests,
    live,
    release_id,
    roll_out,
    run,
    start_agent_with,
)


def test_rollout_converges_wave_by_wave(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 5, INTEL: 5})
    v2 = release_id(demo_models["digits-v2"])
    check = run(_rollout(fleet, demo_models))

    assert check.violations == []
    # One promotion per wave (the last one's is the completion), each once
    # healthy >= targeted.
    assert [wave for wave, _, _ in check.promotions] == [0, 1, 2]
    assert all(healthy >= targeted > 0 for _, healthy, targeted in check.promotions)
    entries = [e for e in audit_log(fleet) if e["rollout"] == "upgrade-v2"]
    assert entries[0]["event"] == "admitted"
    for hw_class in (JETSON, INTEL):
        # Each class runs its own waves: two promotions, then its completion.
        own = [e["event"] for e in entries if e["detail"].startswith(f"{hw_class}:")]
        assert own == ["advance", "advance", "complete"], (hw_class, entries)
    assert all(agent.active_release is not None for agent in fleet.agents.values())
    assert {a.active_release.release_id for a in fleet.agents.values() if a.active_release} == {v2}


async def _rollout(fleet: Fleet, demo_models: dict[str, DemoModel]) -> PromotionCheck:
    v1 = release_id(demo_models["digits-v1"])
    v2 = release_id(demo_models["digits-v2"])
    devices = fleet.home.devices()
    canaries = canaries_of(fleet)
    # One canary infers slowly, so it reports well after the rest of the first wave:
    # a promotion that did not wait for every device would show here.
    straggler = canaries[0]
    others = [d for d in devices if d != straggler]
    async with (
        live(fleet, agents=others) as tg,
        Wire.open(fleet.home) as wire,
        fleet.operator() as operator,
    ):
        start_agent_with(fleet, tg, straggler, inference_hz=8.0)
        await roll_out(operator, fleet, wire, demo_models["digits-v1"], rollout_id="install-v1")
        assert {a.active_release.release_id for a in fleet.agents.values() if a.active_release} == {
            v1
        }

        check = PromotionCheck(wire, "upgrade-v2", v2, devices)
        wire.on_status.append(check)
        final = await roll_out(
            operator,
            fleet,
            wire,
            demo_models["digits-v2"],
            rollout_id="upgrade-v2",
            waves=WAVES,
            canaries=canaries,
        )

        # Status: waves 0, 1, 2 in order, then completed past the last one.
        assert wire.waves_seen("upgrade-v2") == [0, 1, 2, 3]
        assert [s.phase for s in wire.statuses["upgrade-v2"][:-1]] == [Phase.WAVE] * (
            len(wire.statuses["upgrade-v2"]) - 1
        )
        assert final.phase is Phase.COMPLETED
        assert final.counts.targeted == len(devices) == final.counts.healthy
        assert final.release == v2

        # Manifests, verified as each class's devices verify them.
        for hw_class in fleet.classes:
            check_wave_manifests(wire, hw_class, "upgrade-v2", v2)

        # Every agent serves v2, and says so on the wire.
        for device_id, agent in fleet.agents.items():
            assert agent.active_release is not None, device_id
            assert agent.active_release.release_id == v2, device_id
        await wire.until(
            lambda: all(
                (s := wire.states.get(d)) is not None and s.active_release == v2 for d in devices
            ),
            what="every retained device state to show v2",
        )
        assert fleet.coordinator is not None
        assert fleet.coordinator.rollouts["upgrade-v2"].phase is Phase.COMPLETED
        assert wire.undecodable == []
    return check
