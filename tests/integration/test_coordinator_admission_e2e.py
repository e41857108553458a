"""Admitting rollout specs on a real broker: specs racing for one artifact or one class,
an abort that arrives while the first generation is still being validated, and specs
first seen paused or aborted. No agents: admission happens before any device sees a
rollout, and devices would only blur what the manifests show."""

from __future__ import annotations

import asyncio

from coordinator.operator import publish_artifact
from edgefleet.fleet import Fleet
from models import DemoModel
from schemas import Desired, Phase, RolloutStatus
from tests.integration.fleetkit import (
    INTEL,
    JETSON,
    MakeFleet,
    Wire,
    audit_log,
    eventually,
    live,
    publish_spec,
    run,
    spec_for,
    stop_coordinator,
)

FETCH_TIMEOUT_S = 3.0


def _latest(wire: Wire, rollout_id: str) -> RolloutStatus | None:
    history = wire.statuses.get(rollout_id)
    return history[-1] if history else None


def test_specs_sharing_an_artifact_share_one_fetch_and_one_class_takes_one_rollout(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 1, INTEL: 1})
    run(_shared_artifact(fleet, demo_models["digits-v2"]))


async def _shared_artifact(fleet: Fleet, v2: DemoModel) -> None:
    async with (
        live(fleet, coordinator=False, agents=()) as tg,
        Wire.open(fleet.home) as wire,
        fleet.operator() as operator,
    ):
        task = fleet.start_coordinator(tg, artifact_timeout_s=FETCH_TIMEOUT_S)
        await asyncio.sleep(0.5)
        # Three specs on one artifact, before it is published: all three wait for it.
        # "a" and "c" also want the same class.
        for rollout_id, classes in [("a", (JETSON,)), ("b", (INTEL,)), ("c", (JETSON,))]:
            await publish_spec(
                operator, fleet.home, spec_for(v2, rollout_id=rollout_id, classes=classes)
            )
        await asyncio.sleep(0.5)
        await publish_artifact(operator, v2.path.read_bytes(), name=v2.name)
        statuses = await wire.until(
            lambda: (
                [_latest(wire, r) for r in "abc"] if all(_latest(wire, r) for r in "abc") else None
            ),
            what="a status for every spec",
        )
        # Longer than a fetch may take: a fetch orphaned by another spec's would fail now.
        await asyncio.sleep(FETCH_TIMEOUT_S + 1.0)
        assert fleet.coordinator_task is not None
        assert not fleet.coordinator_task.done(), fleet.coordinator_task
        assert task.rollouts["b"].phase is Phase.WAVE
        phases = {r: s.phase for r, s in zip("abc", statuses, strict=True) if s is not None}
        assert phases["b"] is Phase.WAVE
        # Exactly one rollout per class: the other is refused, naming the one it lost to.
        assert sorted([phases["a"], phases["c"]]) == sorted([Phase.WAVE, Phase.REJECTED])
        loser = "a" if phases["a"] is Phase.REJECTED else "c"
        reason = task.rollouts[loser].reason or ""
        assert "classes already in rollout" in reason, reason
        assert {r: task.rollouts[r].phase for r in "abc"} == phases


def test_abort_arriving_while_the_first_generation_is_validated_is_not_lost(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 1})
    run(_abort_during_validation(fleet, demo_models["digits-v2"]))


async def _abort_during_validation(fleet: Fleet, v2: DemoModel) -> None:
    async with (
        live(fleet, agents=()),
        Wire.open(fleet.home) as wire,
        fleet.operator() as operator,
    ):
        await asyncio.sleep(0.5)
        first = spec_for(v2, rollout_id="r", classes=(JETSON,))
        await publish_spec(operator, fleet.home, first)
        await asyncio.sleep(0.3)  # the coordinator now waits for the artifact
        aborted = first.model_copy(update={"generation": 2, "desired": Desired.ABORTED})
        await publish_spec(operator, fleet.home, aborted)
        await asyncio.sleep(0.3)
        await publish_artifact(operator, v2.path.read_bytes(), name=v2.name)
        final = await wire.until(lambda: wire.final_status("r"), what="r to end", timeout=20.0)
        assert (final.phase, final.generation) == (Phase.ROLLED_BACK, 2), final
        assert final.reason == "aborted by operator"
        await asyncio.sleep(1.0)
        # No device was ever offered the aborted candidate.
        assert all(m.rollout is None for m in wire.verified_manifests(JETSON))


def test_spec_first_seen_paused_or_aborted_publishes_no_wave(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 1, INTEL: 1})
    run(_first_seen_paused_or_aborted(fleet, demo_models["digits-v2"]))


async def _first_seen_paused_or_aborted(fleet: Fleet, v2: DemoModel) -> None:
    async with (
        live(fleet, agents=()),
        Wire.open(fleet.home) as wire,
        fleet.operator() as operator,
    ):
        await publish_artifact(operator, v2.path.read_bytes(), name=v2.name)
        paused = spec_for(v2, rollout_id="p", classes=(JETSON,), desired=Desired.PAUSED)
        await publish_spec(operator, fleet.home, paused)
        aborted = spec_for(v2, rollout_id="x", classes=(INTEL,), desired=Desired.ABORTED)
        await publish_spec(operator, fleet.home, aborted)
        status = await wire.until(lambda: _latest(wire, "p"), what="p's status")
        assert status.phase is Phase.PAUSED, status
        final = await wire.until(lambda: wire.final_status("x"), what="x's status")
        assert (final.phase, final.reason) == (Phase.ROLLED_BACK, "aborted by operator")
        await asyncio.sleep(1.5)  # a few ticks
        assert wire.manifests.get(JETSON, []) == []
        assert wire.manifests.get(INTEL, []) == []
        assert [s.phase for s in wire.statuses["p"]] == [Phase.PAUSED]

        # Resumed, it starts with its first wave.
        resumed = paused.model_copy(update={"generation": 2, "desired": Desired.ACTIVE})
        await publish_spec(operator, fleet.home, resumed)
        wave = await wire.until(
            lambda: next(
                (m for m in wire.verified_manifests(JETSON) if m.rollout is not None), None
            ),
            what="p's first wave",
        )
        assert wave.rollout is not None
        assert (wave.rollout.id, wave.rollout.cutoff_bp) == ("p", 10000)
        status = await wire.until(
            lambda: s if (s := _latest(wire, "p")) and s.phase is Phase.WAVE else None,
            what="p in its wave",
        )
        assert status.generation == 2


def test_spec_whose_validation_the_link_cut_short_is_deferred_not_rejected(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 1})
    run(_link_cut_during_validation(fleet, demo_models["digits-v2"]))


async def _link_cut_during_validation(fleet: Fleet, v2: DemoModel) -> None:
    async with asyncio.TaskGroup() as tg:
        fleet.start_coordinator(tg, artifact_timeout_s=FETCH_TIMEOUT_S)
        try:
            async with fleet.operator() as operator:
                await asyncio.sleep(0.5)
                spec = spec_for(v2, rollout_id="r", classes=(JETSON,))
                await publish_spec(operator, fleet.home, spec)
            coordinator = fleet.coordinator
            assert coordinator is not None

            async def validating() -> bool:
                return "r" in coordinator.validating

            # The coordinator now waits for the artifact: the link goes while it does.
            await eventually(validating, what="r being validated")
            await asyncio.to_thread(fleet.broker.stop)
            await asyncio.sleep(FETCH_TIMEOUT_S + 1.0)  # its fetch times out, link down
            await asyncio.to_thread(fleet.broker.start)
            async with fleet.operator() as operator, Wire.open(fleet.home) as wire:
                await publish_artifact(operator, v2.path.read_bytes(), name=v2.name)
                await wire.until(lambda: _latest(wire, "r"), what="r decided", timeout=30.0)
                admitted = _latest(wire, "r")
                assert admitted is not None
                assert admitted.phase is Phase.WAVE, admitted
            events = [e["event"] for e in audit_log(fleet) if e["rollout"] == "r"]
            assert events[:2] == ["spec_deferred", "admitted"], events
        finally:
            await stop_coordinator(fleet)
