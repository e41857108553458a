"""Agents against the real broker when bytes and disks fail (issue 7, rules 4, 5, 7):

- a corrupt chunk of the stable release is dropped and fetched again, with an event and
  no verdict, and a new device converges once the genuine bytes are back;
- a chunk kept on disk and tampered while the agent was down is hashed again, and the
  update completes healthy;
- a damaged state file is set aside and the device rebuilds from the retained topics;
- a damaged outbox is set aside: the device serves on, says what was lost, and reports;
- a full data folder and a read-only one are seen remotely in the retained state, and
  heal by themselves, telemetry included;
- SIGTERM and SIGINT stop a real agent process cleanly: its open telemetry window is
  delivered and its presence says offline.

Artifacts, trust and manifests are published as the coordinator would (no coordinator
runs: what the agent does with the bytes is the point, not who re-asserts them)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from agent import Agent
from agent.lifecycle import Stage
from broker.session import Session
from edgefleet.fleet import Fleet
from models import DemoModel
from schemas import (
    OFFLINE,
    ONLINE,
    DeviceState,
    Event,
    EventKind,
    Mode,
    Reason,
    Release,
    Verdict,
    encode,
    topics,
)
from tests.diskfaults import fill, remount, tmpfs
from tests.integration.fleetkit import (
    JETSON,
    MakeFleet,
    Wire,
    coordinator_session,
    live,
    manifest,
    manifest_key,
    profiles,
    publish_fetchable,
    publish_manifest,
    release_for,
    run,
    sign,
    start_agent_with,
    stop_agent,
)

FAST = {"retry_s": 0.5, "retry_max_s": 2.0, "state_interval_s": 0.5}
"""Retries within a test's patience."""


async def _publish_v1(cloud: Session, fleet: Fleet, model: DemoModel, seq: int = 1) -> Release:
    release = release_for(model, profiles(fleet)[JETSON])
    await publish_fetchable(cloud, model.path.read_bytes(), name=model.name)
    await cloud.publish(topics.trust(), fleet.home.trust(), retain=True)
    await publish_manifest(
        cloud, JETSON, sign(manifest(JETSON, seq, release), manifest_key(fleet.home))
    )
    return release


def _serves(agent: Agent, release: Release) -> bool:
    return agent.stage is Stage.SERVING and agent.active_release == release


def _state(wire: Wire, device_id: str, ok: Callable[[DeviceState], bool]) -> DeviceState | None:
    """The device's last retained state, when ``ok`` holds for it."""
    state = wire.states.get(device_id)
    return state if state is not None and ok(state) else None


def _data(fleet: Fleet, device_id: str) -> Path:
    return fleet.workdir / "agents" / device_id


# -- rule 5: corrupt chunks are fetched again, never a verdict -------------------------


def test_corrupt_chunk_of_the_stable_release_is_refetched_and_the_device_converges(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 1})
    run(_corrupt_chunk(fleet, demo_models["digits-v1"]))


async def _corrupt_chunk(fleet: Fleet, model: DemoModel) -> None:
    (device_id,) = fleet.home.devices()
    data = model.path.read_bytes()
    async with (
        live(fleet, coordinator=False, agents=()) as tg,
        Wire.open(fleet.home) as wire,
        coordinator_session(fleet.home) as cloud,
    ):
        v1 = await _publish_v1(cloud, fleet, model)
        sha = v1.artifact.sha256
        # Someone with write access to artifacts/ overwrites the (only) chunk.
        await cloud.publish(topics.artifact_chunk(sha, 0), b"\0" * len(data[:4096]), retain=True)
        agent = start_agent_with(fleet, tg, device_id, **FAST)

        def retries() -> list[str | None]:
            return [
                e.reason
                for e in wire.events
                if e.kind is EventKind.ARTIFACT_RETRY and e.device_id == device_id
            ]

        await wire.until(lambda: len(retries()) >= 2, what="the chunk fetched again, twice")
        assert set(retries()) == {Reason.CHUNK_CORRUPT.value}
        assert device_id not in wire.health, "a corrupt chunk is no verdict"
        assert agent.failed_releases == ()
        # The genuine bytes are back: the device converges by itself.
        await publish_fetchable(cloud, data, name=model.name)
        await wire.until(lambda: _serves(agent, v1), what="v1 served")
        report = await wire.until(lambda: wire.health.get(device_id), what="a health report")
        assert report.verdict is Verdict.HEALTHY


def test_kept_chunk_tampered_while_the_agent_was_down_is_hashed_again(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 1})
    run(_kept_chunk(fleet, demo_models["digits-v1"]))


async def _kept_chunk(fleet: Fleet, model: DemoModel) -> None:
    (device_id,) = fleet.home.devices()
    sha = model.sha256
    # What an interrupted fetch left, then changed on disk while the agent was down.
    kept = _data(fleet, device_id) / "artifacts" / "partial" / sha / "0"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"\xff" * 1024)
    async with (
        live(fleet, coordinator=False),
        Wire.open(fleet.home) as wire,
        coordinator_session(fleet.home) as cloud,
    ):
        agent = fleet.agents[device_id]
        v1 = await _publish_v1(cloud, fleet, model)
        await wire.until(lambda: _serves(agent, v1), what="v1 served")
        report = await wire.until(lambda: wire.health.get(device_id), what="a health report")
        assert report.verdict is Verdict.HEALTHY
        told = await wire.until(
            lambda: next((e for e in wire.events if e.kind is EventKind.STORAGE_DAMAGED), None),
            what="the tampered chunk told",
        )
        assert "kept chunks 0 fail their sha256" in told.detail
        assert not [e for e in wire.events if e.kind is EventKind.ARTIFACT_REJECTED]


# -- rule 4: a damaged state file ------------------------------------------------------


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage"])
def test_damaged_state_file_device_rebuilds_from_retained_topics(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet, how: str
) -> None:
    fleet = make_fleet({JETSON: 1})
    run(_damaged_state(fleet, demo_models["digits-v1"], how))


async def _damaged_state(fleet: Fleet, model: DemoModel, how: str) -> None:
    (device_id,) = fleet.home.devices()
    state_file = _data(fleet, device_id) / "state.json"
    async with _damaged(fleet, model, state_file, how, seq=4) as (wire, agent, v1, told):
        assert str(state_file) in told.detail
        await wire.until(lambda: _serves(agent, v1), what="v1 served again")
        state = await wire.until(
            lambda: _state(
                wire, device_id, lambda s: s.applied_seq == 4 and s.mode is Mode.SERVING
            ),
            what="the applied seq rebuilt and the device serving",
        )
        assert state.active_sha256 == v1.artifact.sha256
    assert list(state_file.parent.glob("state.json.damaged-*"))


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage"])
def test_damaged_outbox_device_serves_on_tells_and_reports_again(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet, how: str
) -> None:
    fleet = make_fleet({JETSON: 1})
    run(_damaged_outbox(fleet, demo_models["digits-v1"], how))


async def _damaged_outbox(fleet: Fleet, model: DemoModel, how: str) -> None:
    (device_id,) = fleet.home.devices()
    outbox = _data(fleet, device_id) / "outbox.sqlite"
    async with _damaged(fleet, model, outbox, how) as (wire, agent, v1, told):
        assert str(outbox.name) in told.detail
        assert "lost" in told.detail
        await wire.until(lambda: _serves(agent, v1), what="v1 served again")
        before = _counted(wire, device_id)
        await wire.until(lambda: _counted(wire, device_id) > before, what="telemetry flowing again")
    assert list(outbox.parent.glob("outbox.sqlite.damaged-*"))


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    damage = {"empty": b"", "truncated": data[: len(data) // 2], "garbage": os.urandom(8192)}
    path.write_bytes(damage[how])


@contextlib.asynccontextmanager
async def _damaged(
    fleet: Fleet, model: DemoModel, path: Path, how: str, seq: int = 1
) -> AsyncIterator[tuple[Wire, Agent, Release, Event]]:
    """The one device serving ``model``, stopped, ``path`` damaged (empty, truncated or
    garbage), started again: yields once it told of the damage."""
    (device_id,) = fleet.home.devices()
    async with (
        live(fleet, coordinator=False) as tg,
        Wire.open(fleet.home) as wire,
        coordinator_session(fleet.home) as cloud,
    ):
        v1 = await _publish_v1(cloud, fleet, model, seq=seq)
        await wire.until(lambda: _serves(fleet.agents[device_id], v1), what="v1 served")
        await stop_agent(fleet, device_id)
        await asyncio.to_thread(_damage, path, how)
        agent = start_agent_with(fleet, tg, device_id, **FAST)
        told = await wire.until(
            lambda: next((e for e in wire.events if e.kind is EventKind.STORAGE_DAMAGED), None),
            what=f"the damaged {path.name} told",
        )
        yield wire, agent, v1, told


# -- rule 7: a full or read-only data folder, seen remotely, healed --------------------


def _counted(wire: Wire, device_id: str) -> int:
    return sum(s.count for s in wire.telemetry.values() if s.device_id == device_id)


def test_full_disk_is_seen_remotely_and_heals(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 1})
    (device_id,) = fleet.home.devices()
    with tmpfs(_data(fleet, device_id), "8m") as data:
        run(_full_disk(fleet, demo_models["digits-v1"], data))


async def _full_disk(fleet: Fleet, model: DemoModel, data: Path) -> None:
    (device_id,) = fleet.home.devices()
    async with (
        live(fleet, coordinator=False, agents=()) as tg,
        Wire.open(fleet.home) as wire,
        coordinator_session(fleet.home) as cloud,
    ):
        agent = start_agent_with(fleet, tg, device_id, **FAST)
        v1 = await _publish_v1(cloud, fleet, model)
        await wire.until(lambda: _serves(agent, v1), what="v1 served")
        ballast = await asyncio.to_thread(fill, data)
        state = await wire.until(
            lambda: _state(wire, device_id, lambda s: s.mode is Mode.DEGRADED),
            what="the device degraded",
        )
        assert state.degraded_reason is not None
        assert "full" in state.degraded_reason or "space" in state.degraded_reason
        served = agent.inferences_total
        await wire.until(lambda: agent.inferences_total > served + 30, what="inference going on")
        ballast.unlink()
        await wire.until(
            lambda: _state(
                wire, device_id, lambda s: s.mode is Mode.SERVING and s.degraded_reason is None
            ),
            what="the device healed",
        )
        healed_at = agent.inferences_total
        await wire.until(
            lambda: _counted(wire, device_id) >= healed_at, what="every inference reported"
        )
        await wire.until(
            lambda: any(e.kind is EventKind.STORAGE_RECOVERED for e in wire.events),
            what="a storage_recovered event",
        )


def test_read_only_data_folder_is_seen_remotely_and_telemetry_heals(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 1})
    (device_id,) = fleet.home.devices()
    with tmpfs(_data(fleet, device_id), "32m") as data:
        try:
            run(_read_only(fleet, demo_models["digits-v1"], data))
        finally:
            remount(data, "rw")


async def _read_only(fleet: Fleet, model: DemoModel, data: Path) -> None:
    (device_id,) = fleet.home.devices()
    async with (
        live(fleet, coordinator=False, agents=()) as tg,
        Wire.open(fleet.home) as wire,
        coordinator_session(fleet.home) as cloud,
    ):
        first = start_agent_with(fleet, tg, device_id, **FAST)
        v1 = await _publish_v1(cloud, fleet, model)
        await wire.until(lambda: _serves(first, v1), what="v1 served")
        await stop_agent(fleet, device_id)
        await asyncio.to_thread(remount, data, "ro")
        wire.states.pop(device_id, None)
        agent = start_agent_with(fleet, tg, device_id, **FAST)
        state = await wire.until(
            lambda: _state(wire, device_id, lambda s: s.mode is Mode.DEGRADED),
            what="the device degraded",
        )
        assert state.degraded_reason is not None
        assert "outbox" in state.degraded_reason
        assert _serves(agent, v1)  # inference from the store it can still read
        served = agent.inferences_total
        await asyncio.to_thread(remount, data, "rw")
        await wire.until(
            lambda: _state(wire, device_id, lambda s: s.mode is Mode.SERVING),
            what="the device healed",
        )
        # What was counted while the folder was read-only is reported too.
        await wire.until(
            lambda: _counted(wire, device_id) >= first.inferences_total + served,
            what="telemetry of the read-only time reported",
        )


# -- rule 7: SIGTERM and SIGINT stop a real agent process cleanly -----------------------

_REPO = Path(__file__).resolve().parents[2]
_AGENT_PROCESS = """
import asyncio, sys
from pathlib import Path
from agent import AgentConfig
from edgefleet.compose import make_agent

config = AgentConfig(data_dir=Path(sys.argv[2]), inference_hz=30.0, reconnect_s=0.5,
                     telemetry_window_s=3600.0, state_interval_s=0.5)
asyncio.run(make_agent(Path(sys.argv[1]), config, seed=0).run_until_signalled())
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_an_agent_process_cleanly(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet, sig: signal.Signals
) -> None:
    fleet = make_fleet({JETSON: 1})
    run(_signalled(fleet, demo_models["digits-v1"], sig))


async def _signalled(fleet: Fleet, model: DemoModel, sig: signal.Signals) -> None:
    (device_id,) = fleet.home.devices()
    async with (
        Wire.open(fleet.home) as wire,
        coordinator_session(fleet.home) as cloud,
    ):
        v1 = await _publish_v1(cloud, fleet, model)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _AGENT_PROCESS,
            str(fleet.home.root / "devices" / device_id),
            str(_data(fleet, device_id)),
            cwd=_REPO,
        )
        try:
            await wire.until(
                lambda: _state(
                    wire,
                    device_id,
                    lambda s: (
                        s.active_sha256 == v1.artifact.sha256
                        and s.mode is Mode.SERVING
                        and s.inferences_total > 30
                    ),
                ),
                what="the process serving v1",
            )
            assert wire.presence.get(device_id) == ONLINE
            assert _counted(wire, device_id) == 0  # its window is an hour long
            process.send_signal(sig)
            code = await asyncio.wait_for(process.wait(), 30.0)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert code == 0
        await wire.until(lambda: wire.presence.get(device_id) == OFFLINE, what="offline")
        # The open window was committed and delivered before the process left.
        counted = await wire.until(lambda: _counted(wire, device_id), what="its telemetry")
        assert counted > 30


# -- no verdict from a whole file that contradicts the meta either ----------------------


def test_meta_that_contradicts_the_manifest_is_retried_not_a_verdict(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 1})
    run(_lying_meta(fleet, demo_models["digits-v1"], demo_models["digits-v2"]))


async def _lying_meta(fleet: Fleet, model: DemoModel, other: DemoModel) -> None:
    (device_id,) = fleet.home.devices()
    async with (
        live(fleet, coordinator=False),
        Wire.open(fleet.home) as wire,
        coordinator_session(fleet.home) as cloud,
    ):
        agent = fleet.agents[device_id]
        v1 = await _publish_v1(cloud, fleet, model)
        await wire.until(lambda: _serves(agent, v1), what="v1 served")
        v2 = release_for(other, profiles(fleet)[JETSON])
        # v2's chunks under v2's name, but a meta there describing v1: unsigned, so a
        # writer of artifacts/ may have put it there. Retried, never a verdict.
        meta = await publish_fetchable(cloud, other.path.read_bytes(), name=other.name)
        lying = await publish_fetchable(cloud, model.path.read_bytes(), name=model.name)
        await cloud.publish(topics.artifact_meta(meta.sha256), encode(lying), retain=True)
        await publish_manifest(
            cloud, JETSON, sign(manifest(JETSON, 2, v2), manifest_key(fleet.home))
        )
        await wire.until(
            lambda: any(
                e.kind is EventKind.ARTIFACT_RETRY and e.reason == Reason.ARTIFACT_MISMATCH.value
                for e in wire.events
            ),
            what="an artifact_retry event",
        )
        assert wire.health[device_id].release == v1.release_id  # no verdict on v2
        await publish_fetchable(cloud, other.path.read_bytes(), name=other.name)
        await wire.until(lambda: _serves(agent, v2), what="v2 served once the meta is right")
