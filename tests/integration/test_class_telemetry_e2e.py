"""The fleet's telemetry aggregated per class, against the real broker, a real coordinator
and real agents running the demo model: the retained ``classes/{class}/telemetry`` counts
exactly what the coordinator's ledger counted, drift is raised when the cameras start
seeing something else than during the rollout, a health breach when inferences start
failing after the soak, and both land in the audit log. The read-only watcher account
reads the snapshot."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Final

import numpy as np

from agent import Agent, Bundle
from agent.runtime import Feed
from broker.session import Session
from coordinator import Coordinator
from coordinator.aggregate import AggregateSettings
from coordinator.audit import AUDIT_FILENAME, read_audit
from coordinator.drift import DriftPolicy
from edgefleet.fleet import Fleet
from edgefleet.home import WATCHER
from edgefleet.sources import digits_source
from models import DemoModel
from schemas import ClassTelemetry, ReferenceSource, ReleaseTelemetry, decode, topics
from tests.integration.fleetkit import (
    INTEL,
    MakeFleet,
    Wire,
    live,
    release_id,
    restart_idle,
    roll_out,
    run,
    stop_coordinator,
)

DRIFT: Final = DriftPolicy(psi=0.25, min_inferences=150, reference_inferences=300)
"""The shipped threshold; fewer inferences needed than in production, so a test takes
seconds."""
REPORTS: Final = AggregateSettings(publish_s=0.5, audit_gap_s=0.0)


class Camera:
    """A device's input that the test points elsewhere: real held-out digits, then blank
    frames (the model keeps answering, with other labels and confidences), then a camera
    that fails (every inference an error)."""

    def __init__(self, seed: int) -> None:
        self._digits = digits_source(seed)
        self.mode = "digits"

    def __call__(self) -> Feed:
        frame = next(self._digits)
        if self.mode == "broken":
            msg = "camera unplugged"
            raise OSError(msg)
        if self.mode == "blank":
            return {name: np.zeros_like(x) for name, x in frame.items()}
        return frame


@dataclass
class Snapshots:
    """Every class's retained telemetry as a dashboard reads it."""

    latest: dict[str, ClassTelemetry] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def follow(self, session: Session) -> None:
        async for message in session.messages():
            parsed = topics.parse(message.topic)
            if parsed.name is not None and message.payload:
                self.latest[parsed.name] = decode(message.payload, ClassTelemetry)
                self.changed.set()

    async def until(
        self, probe: Callable[[ReleaseTelemetry], bool], release: str, *, what: str
    ) -> ReleaseTelemetry:
        """The first snapshot of ``release`` (of the INTEL class) ``probe`` accepts; a
        hang guard of 90 s, which says what was last seen."""
        shown: list[ReleaseTelemetry] = []
        try:
            async with asyncio.timeout(90.0):
                while True:
                    self.changed.clear()
                    snapshot = self.latest.get(INTEL)
                    shown = (
                        [r for r in snapshot.releases if r.release == release] if snapshot else []
                    )
                    if shown and probe(shown[0]):
                        return shown[0]
                    await self.changed.wait()
        except TimeoutError:
            msg = f"timed out waiting for {what}; last seen: {shown}"
            raise AssertionError(msg) from None


@contextlib.asynccontextmanager
async def _watching(fleet: Fleet) -> AsyncIterator[Snapshots]:
    """The watcher account (the dashboards' rights) following every class's snapshot."""
    snapshots = Snapshots()
    async with Session(fleet.home.service_endpoint(WATCHER), client_id=WATCHER) as session:
        await session.subscribe(topics.all_class_telemetry())
        task = asyncio.create_task(snapshots.follow(session))
        try:
            yield snapshots
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _start(fleet: Fleet, tg: asyncio.TaskGroup, device_id: str, camera: Camera) -> Agent:
    bundle_dir = fleet.home.root / "devices" / device_id
    config = replace(fleet.agent_config, data_dir=fleet.workdir / "agents" / device_id)
    agent = Agent(Bundle.load(bundle_dir), bundle_dir, config, camera)
    fleet.agents[device_id] = agent
    fleet.agent_tasks[device_id] = tg.create_task(agent.run())
    return agent


def test_class_telemetry_counts_what_was_counted_and_raises_drift_and_breach(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({INTEL: 2})
    run(_scenario(fleet, demo_models["digits-v1"]))


def _start_coordinator(fleet: Fleet, tg: asyncio.TaskGroup) -> Coordinator:
    """The coordinator, reporting often, with the test's drift policy for every class."""
    profiles = {
        name: profile.model_copy(update={"drift": DRIFT})
        for name, profile in fleet.class_profiles().items()
    }
    return fleet.start_coordinator(tg, profiles=profiles, telemetry=REPORTS)


async def _installed_and_drifted(
    fleet: Fleet, tg: asyncio.TaskGroup, wire: Wire, snapshots: Snapshots, model: DemoModel
) -> dict[str, Camera]:
    """Agents on cameras, ``model`` rolled out to them, its reference fixed from the
    rollout, then every camera blank until the coordinator says the release drifted."""
    cameras = {d: Camera(seed=n) for n, d in enumerate(fleet.home.devices())}
    for device_id, camera in cameras.items():
        _start(fleet, tg, device_id, camera)
    async with fleet.operator() as operator:
        await roll_out(operator, fleet, wire, model, rollout_id="install-v1")
    release = release_id(model)
    fixed = await snapshots.until(
        lambda r: r.drift.reference is not None, release, what="the reference"
    )
    assert fixed.drift.reference is ReferenceSource.ROLLOUT
    assert fixed.drift.reference_inferences >= DRIFT.reference_inferences
    assert not fixed.drift.alert
    assert not fixed.health.breach
    for camera in cameras.values():
        camera.mode = "blank"
    drifted = await snapshots.until(lambda r: r.drift.alert, release, what="drift")
    assert drifted.drift.labels_psi is not None or drifted.drift.confidence_psi is not None
    return cameras


async def _scenario(fleet: Fleet, model: DemoModel) -> None:
    devices = list(fleet.home.devices())
    release = release_id(model)
    async with (
        live(fleet, coordinator=False, agents=()) as tg,
        Wire.open(fleet.home) as wire,
        _watching(fleet) as snapshots,
    ):
        coordinator = _start_coordinator(fleet, tg)
        cameras = await _installed_and_drifted(fleet, tg, wire, snapshots, model)

        for camera in cameras.values():
            camera.mode = "broken"
        breached = await snapshots.until(lambda r: r.health.breach, release, what="a breach")
        assert any(r.startswith("error_rate:") for r in breached.health.reasons)

        # Every window sent: the agents stop (their open windows kept), start again
        # without inferring more, and send what was not acknowledged.
        made, again = await restart_idle(fleet, tg, devices)

        def ledger() -> tuple[int, int]:
            marks = [coordinator.telemetry.committed(d) for d in devices]
            return (
                sum(0 if m is None else m.inferences for m in marks),
                sum(0 if m is None else m.errors for m in marks),
            )

        def everything_counted() -> bool:
            expected = sum(made.values()) + sum(a.inferences_total for a in again.values())
            return ledger()[0] == expected

        await wire.until(everything_counted, what="every inference counted")
        counted = ledger()
        final = await snapshots.until(
            lambda r: (r.hour.inferences, r.hour.errors) == counted,
            release,
            what=f"the hour to show {counted}",
        )
        assert coordinator.reporter.engine.stats.unattributed == 0
        assert final.minute.inferences <= final.hour.inferences

    audit = read_audit(fleet.workdir / "coordinator" / AUDIT_FILENAME)
    events = {(e["event"], e["rollout"]) for e in audit}
    assert ("drift", "install-v1") in events
    assert ("health_breach", "install-v1") in events


def test_a_restarted_coordinator_keeps_the_rollouts_reference_and_its_alert(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    """Without its retained snapshot, a restarted coordinator would take the release's
    first hour, drifted already, as its reference, and see no drift for an hour."""
    fleet = make_fleet({INTEL: 2})
    run(_restarted(fleet, demo_models["digits-v1"]))


async def _restarted(fleet: Fleet, model: DemoModel) -> None:
    release = release_id(model)
    async with (
        live(fleet, coordinator=False, agents=()) as tg,
        Wire.open(fleet.home) as wire,
        _watching(fleet) as snapshots,
    ):
        _start_coordinator(fleet, tg)
        await _installed_and_drifted(fleet, tg, wire, snapshots, model)
        before = snapshots.latest[INTEL].releases[0].drift
        await stop_coordinator(fleet)
        restarted = time.time()
        second = _start_coordinator(fleet, tg)
        after = await snapshots.until(
            lambda r: snapshots.latest[INTEL].at > restarted and r.drift.window_s is not None,
            release,
            what="a snapshot of the restarted coordinator",
        )
        assert (after.drift.reference, after.drift.reference_labels) == (
            before.reference,
            before.reference_labels,
        )
        assert after.drift.alert
        assert after.drift.since == before.since
        assert second.reporter.engine.releases(INTEL) == [release]
    audit = read_audit(fleet.workdir / "coordinator" / AUDIT_FILENAME)
    assert [e["event"] for e in audit].count("drift") == 1
