"""The coordinator dies during wave 2 of 3; a new one on the same data folder resumes
the rollout without skipping or repeating a wave and without reusing a manifest seq."""

from __future__ import annotations

import asyncio
import contextlib

from edgefleet.compose import start_rollout
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
    profiles,
    release_id,
    roll_out,
    run,
)

ROLLOUT = "upgrade-v2"


def test_coordinator_restart_resumes_rollout(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 5, INTEL: 5})
    check = run(_restart(fleet, demo_models))

    assert check.violations == []
    assert [wave for wave, _, _ in check.promotions] == [0, 1, 2]
    entries = [e for e in audit_log(fleet) if e["rollout"] == ROLLOUT]
    assert entries[0]["event"] == "admitted"
    for hw_class in (JETSON, INTEL):
        # Each class runs its own waves: two promotions, then its completion.
        own = [e["event"] for e in entries if e["detail"].startswith(f"{hw_class}:")]
        assert own == ["advance", "advance", "complete"], (hw_class, entries)


async def _restart(fleet: Fleet, demo_models: dict[str, DemoModel]) -> PromotionCheck:
    v2 = release_id(demo_models["digits-v2"])
    devices = fleet.home.devices()
    async with live(fleet) as tg, Wire.open(fleet.home) as wire, fleet.operator() as operator:
        await roll_out(operator, fleet, wire, demo_models["digits-v1"], rollout_id="install-v1")
        check = PromotionCheck(wire, ROLLOUT, v2, devices)
        wire.on_status.append(check)
        await start_rollout(
            operator,
            fleet.home,
            demo_models["digits-v2"].path,
            rollout_id=ROLLOUT,
            name="digits-v2",
            profiles=profiles(fleet),
            classes=tuple(fleet.classes),
            waves=WAVES,
            canaries=canaries_of(fleet),
        )
        await wire.until(
            lambda: any(s.wave == 1 for s in wire.statuses.get(ROLLOUT, [])),
            what="wave 2 to start",
        )
        old, old_task = fleet.coordinator, fleet.coordinator_task
        assert old is not None
        assert old_task is not None
        old_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await old_task
        assert old.rollouts[ROLLOUT].wave == 1
        assert old.rollouts[ROLLOUT].phase is Phase.WAVE
        seqs_before = {c: [m.seq for m in wire.verified_manifests(c)] for c in fleet.classes}
        # While it is down the wave's devices soak and report; their reports wait in
        # the coordinator's persistent session and in the retained health topics.
        await wire.until(
            lambda: (
                sum(
                    1
                    for r in wire.health.values()
                    if r.rollout_id == ROLLOUT and r.verdict.value == "healthy"
                )
                >= len(check.cohort(1))
            ),
            what="wave 2 devices to report while the coordinator is down",
        )
        assert wire.waves_seen(ROLLOUT)[-1] == 1, "the rollout moved with no coordinator"

        new = fleet.start_coordinator(tg)
        assert new is not old
        final = await wire.until(lambda: wire.final_status(ROLLOUT), what="rollout to end")
        assert final.phase is Phase.COMPLETED, final.reason

        # Waves in order, none skipped or repeated: 0, 1 (across the restart), 2, done.
        assert wire.waves_seen(ROLLOUT) == [0, 1, 2, 3]
        for hw_class in fleet.classes:
            seqs = check_wave_manifests(wire, hw_class, ROLLOUT, v2)
            # The new coordinator continued the old one's seq, never reused one.
            assert seqs[: len(seqs_before[hw_class])] == seqs_before[hw_class]
            assert len(seqs) == len(set(seqs))
        assert new.rollouts[ROLLOUT].phase is Phase.COMPLETED
        for device_id, agent in fleet.agents.items():
            assert agent.active_release is not None, device_id
            assert agent.active_release.release_id == v2, device_id
    return check
