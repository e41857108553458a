"""A coordinator whose store was lost recovers from the broker's retained topics: it
continues above the seq devices applied, keeps finished rollouts finished and the
stable artifact's copy, and the next rollout completes. A coordinator stopped by
SIGTERM says ``offline`` and leaves a whole store."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from coordinator.operator import publish_artifact
from edgefleet.fleet import Fleet
from models import DemoModel
from schemas import MAX_SEQ, OFFLINE, ONLINE, Phase, Reason, topics
from tests.integration.fleetkit import (
    JETSON,
    MakeFleet,
    SeenManifest,
    Wire,
    audit_log,
    coordinator_session,
    live,
    manifest,
    manifest_key,
    publish_manifest,
    publish_spec,
    release_id,
    roll_out,
    run,
    sign,
    spec_for,
    stop_coordinator,
)


@pytest.mark.parametrize("lost", ["store", "data folder"])
def test_lost_store_continues_above_the_broker_and_never_readmits_a_finished_rollout(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet, lost: str
) -> None:
    fleet = make_fleet({JETSON: 1})
    run(_lost(fleet, demo_models["digits-v1"], demo_models["digits-v2"], lost))
    events = [(e["rollout"], e["event"]) for e in audit_log(fleet)]
    assert ("install", "recovered") in events, events
    # The audit log is a file of its own: it outlives a lost store, and goes only with
    # the whole data folder.
    assert (("install", "admitted") in events) is (lost == "store"), events


async def _lost(fleet: Fleet, v1: DemoModel, v2: DemoModel, lost: str) -> None:
    folder = fleet.workdir / "coordinator"
    stable_copy = folder / "artifacts" / f"{v1.sha256}.onnx"
    async with live(fleet) as tg, Wire.open(fleet.home) as wire, fleet.operator() as operator:
        await roll_out(operator, fleet, wire, v1, rollout_id="install")
        await stop_coordinator(fleet)
        before = wire.verified_manifests(JETSON)[-1].seq
        known = len(wire.manifests[JETSON])
        if lost == "store":
            for path in folder.glob("coordinator.json*"):
                path.rename(path.with_name(path.name + ".lost"))
        else:  # the copies of the artifacts too: the stable's is fetched back
            folder.rename(folder.with_name("coordinator.lost"))

        fleet.start_coordinator(tg)

        # The new manifest is above the one applied: a device takes it (the wire
        # verifies as a device does, refusing a seq not above the last).
        def newer() -> SeenManifest | None:
            seen = wire.manifests[JETSON]
            return seen[-1] if len(seen) > known else None

        seen = await wire.until(newer, what="a manifest from the recovered coordinator")
        assert seen.verified is not None, seen.rejected
        assert seen.verified.seq > before
        assert seen.verified.stable is not None
        assert seen.verified.stable.release_id == release_id(v1)
        assert seen.verified.rollout is None
        await asyncio.sleep(3.0)  # past the coordinator's prune of unnamed artifacts
        assert stable_copy.exists(), "no copy of the stable artifact"
        assert wire.statuses["install"][-1].phase is Phase.COMPLETED

        await roll_out(operator, fleet, wire, v2, rollout_id="upgrade")
        agent = fleet.agents["jetson-000"]
        assert agent.active_release is not None
        assert agent.active_release.release_id == release_id(v2)


_SERVE = """
import asyncio, sys
from pathlib import Path
from coordinator.service import serve
from edgefleet.home import Home
from edgefleet.compose import coordinator_config

home = Home(Path(sys.argv[1]))
asyncio.run(serve(coordinator_config(home, Path(sys.argv[2]), Path(sys.argv[3]))))
"""


def test_sigterm_stops_the_coordinator_cleanly(make_fleet: MakeFleet) -> None:
    fleet = make_fleet({JETSON: 1})
    run(_sigterm(fleet))


async def _sigterm(fleet: Fleet) -> None:
    data = fleet.workdir / "coordinator"
    assert isinstance(fleet.profiles, Path)
    async with Wire.open(fleet.home, filters=(topics.coordinator_presence(),)) as wire:
        for signum in (signal.SIGTERM, signal.SIGINT):
            wire.raw.clear()
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _SERVE,
                str(fleet.home.root),
                str(data),
                str(fleet.profiles),
                cwd=Path(__file__).parents[2],
                env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
            )
            try:
                await wire.until(
                    lambda: any(m.payload == ONLINE and not m.retain for m in wire.raw),
                    what="the coordinator online",
                    timeout=30.0,
                )
                await asyncio.sleep(0.5)
                process.send_signal(signum)
                async with asyncio.timeout(15.0):
                    code = await process.wait()
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            assert code == 0, (signum, code)

            def offline() -> bool | None:
                said = [m.payload for m in wire.raw if m.topic == topics.coordinator_presence()]
                return said[-1] == OFFLINE or None

            # Sent and acknowledged before the exit, but the wire reads it in its own time.
            await wire.until(offline, what=f"the coordinator offline after signal {signum}")
            document = json.loads((data / "coordinator.json").read_text(encoding="utf-8"))
            assert isinstance(document, dict)


def test_lost_store_resumes_a_live_rollout_at_its_retained_wave(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 1})
    run(_lost_mid_rollout(fleet, demo_models["digits-v2"]))


async def _lost_mid_rollout(fleet: Fleet, v2: DemoModel) -> None:
    folder = fleet.workdir / "coordinator"
    # No device runs: the empty early waves are passed over, the last one waits.
    async with (
        live(fleet, agents=()) as tg,
        Wire.open(fleet.home) as wire,
        fleet.operator() as operator,
    ):
        await publish_artifact(operator, v2.path.read_bytes(), name=v2.name)
        spec = spec_for(v2, rollout_id="r", classes=(JETSON,), waves=(10.0, 50.0, 100.0))
        await publish_spec(operator, fleet.home, spec)
        await wire.until(lambda: wire.waves_seen("r")[-1:] == [2], what="the last wave")
        await stop_coordinator(fleet)
        for path in folder.glob("coordinator.json*"):
            path.rename(path.with_name(path.name + ".lost"))
        known = len(wire.manifests[JETSON])

        fleet.start_coordinator(tg)

        def newer() -> SeenManifest | None:
            seen = wire.manifests[JETSON]
            return seen[-1] if len(seen) > known else None

        seen = await wire.until(newer, what="a manifest from the recovered coordinator")
        assert seen.verified is not None, seen.rejected
        assert seen.verified.rollout is not None
        assert seen.verified.rollout.cutoff_bp == 10000  # the last wave's, not the first's
        assert wire.statuses["r"][-1].wave == 2


def test_a_retained_manifest_at_the_last_seq_is_not_continued_above(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 1})
    run(_last_seq(fleet, demo_models["digits-v1"]))


async def _last_seq(fleet: Fleet, v1: DemoModel) -> None:
    async with live(fleet) as tg, Wire.open(fleet.home) as wire, fleet.operator() as operator:
        await roll_out(operator, fleet, wire, v1, rollout_id="install")
        await stop_coordinator(fleet)
        ours = wire.verified_manifests(JETSON)[-1]
        # Signed with the manifest key at the last seq there is, while the coordinator
        # is down: nothing can follow it, so the coordinator keeps its own seq.
        last = sign(manifest(JETSON, MAX_SEQ, ours.stable), manifest_key(fleet.home))
        async with coordinator_session(fleet.home) as intruder:
            await publish_manifest(intruder, JETSON, last)
        await wire.until(
            lambda: any(m.payload == last for m in wire.manifests[JETSON]), what="the last seq"
        )
        fleet.start_coordinator(tg)

        def put_back() -> SeenManifest | None:
            seen = [m.payload for m in wire.manifests[JETSON]]
            after = wire.manifests[JETSON][seen.index(last) + 1 :]
            return after[-1] if after else None

        restored = await wire.until(put_back, what="the coordinator's own manifest put back")
        # A device that took the last seq refuses it as replayed: the coordinator did not
        # try to go above a seq that leaves no room.
        assert restored.rejected is not None
        assert restored.rejected.reason is Reason.REPLAYED
        await asyncio.sleep(1.0)
        assert fleet.coordinator_task is not None
        assert not fleet.coordinator_task.done()
