"""An agent that is down during a rollout is not waited for, and converges by itself
from the retained manifest when it comes back on the same data folder."""

from __future__ import annotations

from agent.lifecycle import Stage
from edgefleet.compose import start_rollout
from edgefleet.fleet import Fleet
from models import DemoModel
from schemas import OFFLINE, Phase, bucket
from tests.integration.fleetkit import (
    INTEL,
    JETSON,
    WAVES,
    MakeFleet,
    Wire,
    canaries_of,
    live,
    profiles,
    release_id,
    roll_out,
    run,
    stop_agent,
)

ROLLOUT = "upgrade-v2"


def test_restarted_agent_converges_from_retained_manifest(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 5, INTEL: 5})
    run(_restart(fleet, demo_models))


async def _restart(fleet: Fleet, demo_models: dict[str, DemoModel]) -> None:
    v1 = release_id(demo_models["digits-v1"])
    v2 = release_id(demo_models["digits-v2"])
    devices = fleet.home.devices()
    canaries = canaries_of(fleet)
    # The device last in line: only the final wave (100 %) includes it.
    victim = max((d for d in devices if d not in canaries), key=lambda d: bucket(ROLLOUT, d))
    assert bucket(ROLLOUT, victim) >= 5000, "every device is in an early wave"

    async with live(fleet) as tg, Wire.open(fleet.home) as wire, fleet.operator() as operator:
        await roll_out(operator, fleet, wire, demo_models["digits-v1"], rollout_id="install-v1")
        await start_rollout(
            operator,
            fleet.home,
            demo_models["digits-v2"].path,
            rollout_id=ROLLOUT,
            name="digits-v2",
            profiles=profiles(fleet),
            classes=tuple(fleet.classes),
            waves=WAVES,
            canaries=canaries,
        )
        first = await wire.until(
            lambda: next((s for s in wire.statuses.get(ROLLOUT, []) if s.wave == 0), None),
            what="the rollout's first wave",
        )
        assert first.phase is Phase.WAVE
        # Its state says v1 before it goes (a changed state settles a second or two).
        await wire.until(
            lambda: (state := wire.states.get(victim)) is not None and state.active_release == v1,
            what="the victim's state on v1",
        )
        await stop_agent(fleet, victim)
        assert fleet.agents[victim].active_release is not None
        assert fleet.agents[victim].active_release.release_id == v1  # type: ignore[union-attr]
        await wire.until(lambda: wire.presence.get(victim) == OFFLINE, what="victim offline")

        final = await wire.until(lambda: wire.final_status(ROLLOUT), what="rollout to end")
        assert final.phase is Phase.COMPLETED, final.reason
        assert wire.waves_seen(ROLLOUT) == [0, 1, 2, 3]
        # The last wave covered the whole fleet but did not wait for the device that
        # was down: it counted only the others.
        assert final.counts.targeted == len(devices) - 1
        assert final.counts.healthy == len(devices) - 1
        assert wire.presence.get(victim) == OFFLINE
        assert wire.states[victim].active_release == v1
        for device_id, agent in fleet.agents.items():
            if device_id != victim:
                assert agent.active_release is not None
                assert agent.active_release.release_id == v2, device_id

        # Back on the same data folder: it starts on v1 from its own store, reads the
        # retained manifest (v2 is stable now) and converges without the coordinator
        # doing anything for it.
        hw_class = devices[victim]
        latest_seq = wire.verified_manifests(hw_class)[-1].seq
        restarted = fleet.start_agent(tg, victim)
        await wire.until(
            lambda: (
                restarted.stage is Stage.SERVING
                and restarted.active_release is not None
                and restarted.active_release.release_id == v2
            ),
            what="the restarted agent to serve v2",
        )
        assert restarted.applied_seq == latest_seq
        await wire.until(
            lambda: (
                (s := wire.states.get(victim)) is not None
                and s.active_release == v2
                and s.applied_seq == latest_seq
            ),
            what="the restarted agent's retained state to show v2",
        )
        assert wire.verified_manifests(hw_class)[-1].seq == latest_seq, "no new manifest needed"
