"""Rollouts per class against the real broker, coordinator and agents (issue 9, items 1,
3 and 4): devices that die mid-soak fail their class on silence while another class
completes; a paced wave newly targets no more devices a minute than its rate."""

from __future__ import annotations

from agent.lifecycle import Stage
from edgefleet.compose import SpecOptions, publish_rollout
from edgefleet.fleet import Fleet
from models import DemoModel
from schemas import Cause, LanePhase, Phase, WaveSpec, bucket
from tests.integration.fleetkit import (
    INTEL,
    JETSON,
    MakeFleet,
    Wire,
    live,
    profiles,
    release_id,
    roll_out,
    run,
    start_agent_with,
    stop_agent,
)

SILENCE_S = 4.0


def test_devices_dying_mid_soak_roll_back_their_class_on_silence_while_the_other_completes(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 3, INTEL: 3})
    run(_dying_class(fleet, demo_models))


async def _dying_class(fleet: Fleet, demo_models: dict[str, DemoModel]) -> None:
    v1, v2 = demo_models["digits-v1"], demo_models["digits-v2"]
    intel = sorted(d for d, c in fleet.home.devices().items() if c == INTEL)
    async with live(fleet) as tg, Wire.open(fleet.home) as wire, fleet.operator() as operator:
        await roll_out(operator, fleet, wire, v1, rollout_id="install-v1")
        # INTEL devices infer slowly from here on, so that no soak can end (20 inferences
        # at 2 Hz) before the test has stopped every one of them.
        for device_id in intel:
            await stop_agent(fleet, device_id)
            start_agent_with(fleet, tg, device_id, inference_hz=2.0)
        await wire.until(
            lambda: (
                all(
                    fleet.agents[d].stage is Stage.SERVING
                    and fleet.agents[d].active_release is not None
                    for d in intel
                )
                or None
            ),
            what="the INTEL devices serving v1 again",
        )
        await publish_rollout(
            operator,
            fleet.home,
            v2.path,
            rollout_id="upgrade",
            classes=(JETSON, INTEL),
            profiles=profiles(fleet),
            options=SpecOptions(waves=(WaveSpec(percent=100.0),), silence_s=SILENCE_S),
            name=v2.name,
        )

        # The candidate "kills" every INTEL device while it soaks: the process is gone
        # (its Will says offline), it never reports.
        def soaking() -> list[str]:
            return [
                d for d in intel if d in fleet.agents and fleet.agents[d].stage is Stage.SOAKING
            ]

        killed: set[str] = set()
        while len(killed) < len(intel):
            for device_id in await wire.until(soaking, what="an INTEL device soaking"):
                await stop_agent(fleet, device_id)
                del fleet.agents[device_id]
                killed.add(device_id)
        assert not any(
            r.rollout_id == "upgrade" and r.device_id in killed for r in wire.health.values()
        ), "a killed device reported"

        final = await wire.until(lambda: wire.final_status("upgrade"), what="the rollout to end")
        assert final.phase is Phase.ROLLED_BACK
        lanes = final.lanes
        assert lanes[JETSON].phase is LanePhase.COMPLETED
        assert lanes[INTEL].phase is LanePhase.ROLLED_BACK
        assert lanes[INTEL].cause is Cause.SILENT
        assert lanes[INTEL].counts.silent == len(intel)
        assert set(lanes[INTEL].silent) == set(intel)
        assert (
            lanes[INTEL].reason == f"wave 1: {len(intel)} of {len(intel)} targeted devices silent"
        )

        # Only the failing class went back: JETSON's stable is the candidate, INTEL's
        # is still v1 and its manifest names no rollout.
        jetson_last = wire.verified_manifests(JETSON)[-1]
        intel_last = wire.verified_manifests(INTEL)[-1]
        assert jetson_last.rollout is None
        assert jetson_last.stable is not None
        assert jetson_last.stable.release_id == release_id(v2)
        assert intel_last.rollout is None
        assert intel_last.stable is not None
        assert intel_last.stable.release_id == release_id(v1)
        await wire.until(
            lambda: all(
                _runs(fleet, d, v2) for d, c in fleet.home.devices().items() if c == JETSON
            ),
            what="every JETSON device on the candidate",
        )


def _runs(fleet: Fleet, device_id: str, model: DemoModel) -> bool:
    active = fleet.agents[device_id].active_release
    return active is not None and active.release_id == release_id(model)


RATE_PER_MIN = 60


def test_a_paced_wave_newly_targets_at_most_its_rate(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 6})
    run(_paced(fleet, demo_models))


async def _paced(fleet: Fleet, demo_models: dict[str, DemoModel]) -> None:
    v1, v2 = demo_models["digits-v1"], demo_models["digits-v2"]
    devices = sorted(fleet.home.devices())
    async with live(fleet), Wire.open(fleet.home) as wire, fleet.operator() as operator:
        await roll_out(operator, fleet, wire, v1, rollout_id="install-v1", classes=(JETSON,))
        first_seen = len(wire.manifests.get(JETSON, []))
        await publish_rollout(
            operator,
            fleet.home,
            v2.path,
            rollout_id="paced",
            classes=(JETSON,),
            profiles=profiles(fleet),
            options=SpecOptions(waves=(WaveSpec(percent=100.0),), rate_per_min=RATE_PER_MIN),
            name=v2.name,
        )
        final = await wire.until(lambda: wire.final_status("paced"), what="the rollout to end")
        assert final.phase is Phase.COMPLETED

    # The class's manifests for the rollout: each reaches at most one device more per
    # second than the first (60 a minute), and they reach every device in several steps.
    cohorts = [
        (seen.at, seen.verified.rollout.cutoff_bp)
        for seen in wire.manifests[JETSON][first_seen:]
        if seen.verified is not None
        and seen.verified.rollout is not None
        and seen.verified.rollout.id == "paced"
    ]
    reached = [(at, sum(bucket("paced", d) < cutoff for d in devices)) for at, cutoff in cohorts]
    assert len({n for _, n in reached}) >= 3, f"not paced: {reached}"
    start, first = reached[0]
    for at, n in reached:
        # The wire receives a manifest a little after the coordinator decided it: a
        # second of slack, never a whole extra minute's worth.
        assert n - first <= (at - start + 1.0) * RATE_PER_MIN / 60.0, reached
    assert reached[-1][1] == len(devices)


def test_the_status_lists_pending_devices_and_waits_for_none_of_them(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    """A device offline when the wave's manifest goes out is pending: the wave is decided
    without it, and it converges when it comes back."""
    fleet = make_fleet({JETSON: 4})
    run(_pending(fleet, demo_models))


async def _pending(fleet: Fleet, demo_models: dict[str, DemoModel]) -> None:
    v1, v2 = demo_models["digits-v1"], demo_models["digits-v2"]
    devices = sorted(fleet.home.devices())
    away = devices[0]
    async with live(fleet) as tg, Wire.open(fleet.home) as wire, fleet.operator() as operator:
        await roll_out(operator, fleet, wire, v1, rollout_id="install-v1", classes=(JETSON,))
        await stop_agent(fleet, away)
        await wire.until(lambda: wire.presence.get(away) == b"offline", what=f"{away} offline")
        final = await roll_out(operator, fleet, wire, v2, rollout_id="upgrade", classes=(JETSON,))
        lane = final.lanes[JETSON]
        assert (lane.counts.pending, lane.counts.targeted) == (1, len(devices) - 1)
        assert lane.counts.healthy == len(devices) - 1
        fleet.start_agent(tg, away)
        await wire.until(lambda: _runs(fleet, away, v2), what=f"{away} converging later")
