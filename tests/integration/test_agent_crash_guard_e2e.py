"""The crash-loop guard against the real broker (issue 9, item 2): a real agent process
killed with SIGKILL while it soaks a release comes back on the same data folder, serves
the model it had before, reports ``unhealthy`` with ``crashed_during_soak``, and does not
try that release again, not even when its manifest is re-signed.

Artifacts, trust and manifests are published as the coordinator would (no coordinator
runs: what the agent does after the crash is the point)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from agent.events import Desired, FailedRelease
from agent.lifecycle import Stage
from agent.store import AgentStore
from broker.session import Session
from edgefleet.fleet import Fleet
from models import DemoModel
from schemas import EventKind, HealthReport, Mode, Reason, Release, Verdict, topics
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
)

_REPO = Path(__file__).resolve().parents[2]
_AGENT_PROCESS = """
import asyncio, sys
from pathlib import Path
from agent import AgentConfig
from edgefleet.compose import make_agent

config = AgentConfig(data_dir=Path(sys.argv[2]), inference_hz=30.0, reconnect_s=0.5,
                     telemetry_window_s=1.0, state_interval_s=0.5)
asyncio.run(make_agent(Path(sys.argv[1]), config, seed=0).run_until_signalled())
"""
LONG_SOAK_S = 600.0
"""Far longer than the test: the soak is open when the process dies."""
QUIET_S = 1.5
"""How long the restarted agent is watched not to take the release up again."""


def test_agent_killed_mid_soak_reverts_reports_and_never_retries_the_release(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 1})
    run(_killed_mid_soak(fleet, demo_models["digits-v1"], demo_models["digits-v2"]))


async def _publish(
    cloud: Session, fleet: Fleet, model: DemoModel, seq: int, **budget: float
) -> Release:
    profile = profiles(fleet)[JETSON]
    release = release_for(model, profile)
    release = release.model_copy(update={"health": profile.health.model_copy(update=budget)})
    await publish_fetchable(cloud, model.path.read_bytes(), name=model.name)
    await publish_manifest(
        cloud, JETSON, sign(manifest(JETSON, seq, release), manifest_key(fleet.home))
    )
    return release


async def _killed_mid_soak(fleet: Fleet, v1_model: DemoModel, v2_model: DemoModel) -> None:
    (device_id,) = fleet.home.devices()
    data = fleet.workdir / "agents" / device_id
    async with (
        live(fleet, coordinator=False, agents=()) as tg,
        Wire.open(fleet.home) as wire,
        coordinator_session(fleet.home) as cloud,
    ):
        await cloud.publish(topics.trust(), fleet.home.trust(), retain=True)
        v1 = await _publish(cloud, fleet, v1_model, 1)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _AGENT_PROCESS,
            str(fleet.home.root / "devices" / device_id),
            str(data),
            cwd=_REPO,
            env={**os.environ, "PYTHONPATH": str(_REPO)},
        )
        try:
            await wire.until(
                lambda: _in(wire, device_id, v1, Mode.SERVING), what="the process serving v1"
            )
            v2 = await _publish(cloud, fleet, v2_model, 2, soak_seconds=LONG_SOAK_S)
            await wire.until(
                lambda: _in(wire, device_id, v2, Mode.UPDATING), what="the process soaking v2"
            )
            # The record is written before the swap itself, a moment after the state says v2.
            await wire.until(
                lambda: AgentStore(data / "state.json").load().soaking, what="the soak recorded"
            )
        finally:
            process.send_signal(signal.SIGKILL)
            await process.wait()
        assert process.returncode == -signal.SIGKILL

        agent = start_agent_with(fleet, tg, device_id, retry_s=0.2, retry_max_s=0.5)
        report = await wire.until(
            lambda: _report_on(wire, device_id, v2), what="the crash reported", timeout=20.0
        )
        assert report.verdict is Verdict.UNHEALTHY
        assert report.reasons == (Reason.CRASHED_DURING_SOAK.value,)
        assert report.manifest_seq == 2
        rollback = await wire.until(
            lambda: next(
                (
                    e
                    for e in wire.events
                    if e.kind is EventKind.ROLLBACK and e.device_id == device_id
                ),
                None,
            ),
            what="the rollback event",
        )
        assert rollback.reason == Reason.CRASHED_DURING_SOAK.value
        assert (agent.active_release, agent.stage) == (v1, Stage.DEGRADED)
        failed = (FailedRelease.of(Desired(v2, None, 2)),)
        assert agent.failed_releases == failed

        # Re-signed (a new seq, the same release): still not tried.
        await publish_manifest(
            cloud, JETSON, sign(manifest(JETSON, 3, v2), manifest_key(fleet.home))
        )
        await wire.until(lambda: agent.applied_seq == 3, what="the re-sign applied")
        stages: set[Stage] = set()
        quiet_until = time.monotonic() + QUIET_S
        while time.monotonic() < quiet_until:
            stages.add(agent.stage)
            await asyncio.sleep(0.02)
        assert stages == {Stage.DEGRADED}, "the release was taken up again"
        assert agent.active_release == v1
        assert agent.failed_releases == failed
        state = AgentStore(data / "state.json").load()
        assert state.soaking is None, "the guard fires once"


def _in(wire: Wire, device_id: str, release: Release, mode: Mode) -> bool:
    state = wire.states.get(device_id)
    return (
        state is not None and state.active_sha256 == release.artifact.sha256 and state.mode is mode
    )


def _report_on(wire: Wire, device_id: str, release: Release) -> HealthReport | None:
    report = wire.health.get(device_id)
    if report is None or report.release != release.release_id:
        return None
    return report
