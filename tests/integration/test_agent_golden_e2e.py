"""Golden self-test vectors on the real broker: an agent fetches a candidate's golden
set beside the model, and swaps the model in only when it reproduces them.

No coordinator runs: the test publishes the artifacts (model and golden set, chunked
like any artifact, under ``artifacts/``) and the signed manifests on an account with the
coordinator's rights, as the coordinator does after admitting a rollout.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent import Agent
from agent.lifecycle import Stage
from broker.session import Session
from edgefleet.fleet import Fleet
from models import DemoModel, load_digits_split
from models.export import LABEL_OUTPUT
from schemas import (
    ArtifactRef,
    Event,
    EventKind,
    GoldenSet,
    HealthReport,
    Reason,
    Release,
    RolloutCohort,
    Tensor,
    Verdict,
    encode,
    topics,
)
from tests.agent.goldens import golden_for, with_output
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
)

ROLLOUT = "golden-check"


@dataclass
class Scene:
    fleet: Fleet
    wire: Wire
    operator: Session
    cloud: Session
    device_id: str
    agent: Agent
    v1: Release
    v2: Release

    async def publish_golden(self, golden: GoldenSet) -> ArtifactRef:
        """Publish a golden set where devices fetch it, as the coordinator does after
        admission (no coordinator runs here)."""
        meta = await publish_fetchable(self.cloud, encode(golden), name="digits-v2-golden")
        return ArtifactRef(sha256=meta.sha256, size=meta.size)

    async def offer(self, candidate: Release) -> None:
        """Manifest 2: v1 stays stable, ``candidate`` goes to this device (a canary)."""
        cohort = RolloutCohort(
            id=ROLLOUT, candidate=candidate, salt=ROLLOUT, cutoff_bp=0, canaries=(self.device_id,)
        )
        doc = manifest(JETSON, 2, self.v1).model_copy(update={"rollout": cohort})
        await publish_manifest(self.cloud, JETSON, sign(doc, manifest_key(self.fleet.home)))

    async def verdict(self) -> HealthReport:
        return await self.wire.until(
            lambda: (
                r
                if (r := self.wire.health.get(self.device_id)) is not None
                and r.rollout_id == ROLLOUT
                else None
            ),
            what="the candidate's health report",
        )

    def events(self, kind: EventKind, release: Release) -> list[Event]:
        return [e for e in self.wire.events if e.kind is kind and e.release == release.release_id]

    async def event(self, kind: EventKind, release: Release) -> Event:
        return await self.wire.until(
            lambda: next(iter(self.events(kind, release)), None),
            what=f"a {kind.value} event for {release.release_id}",
        )

    def golden_file(self, ref: ArtifactRef) -> Path:
        artifacts = self.fleet.workdir / "agents" / self.device_id / "artifacts"
        return artifacts / "golden" / f"{ref.sha256}.msgpack"


@asynccontextmanager
async def serving_v1(fleet: Fleet, models: dict[str, DemoModel]) -> AsyncIterator[Scene]:
    """One device serving digits-v1 from a signed stable manifest; digits-v2 published."""
    (device_id,) = fleet.home.devices()
    profile = profiles(fleet)[JETSON]
    v1 = release_for(models["digits-v1"], profile)
    v2 = release_for(models["digits-v2"], profile)
    async with (
        live(fleet, coordinator=False),
        Wire.open(fleet.home) as wire,
        fleet.operator() as operator,
        coordinator_session(fleet.home) as cloud,
    ):
        for model in (models["digits-v1"], models["digits-v2"]):
            await publish_fetchable(cloud, model.path.read_bytes(), name=model.name)
        await cloud.publish(topics.trust(), fleet.home.trust(), retain=True)
        await publish_manifest(
            cloud, JETSON, sign(manifest(JETSON, 1, v1), manifest_key(fleet.home))
        )
        agent = fleet.agents[device_id]
        await wire.until(
            lambda: agent.stage is Stage.SERVING and agent.active_release == v1,
            what="v1 to be served",
        )
        yield Scene(fleet, wire, operator, cloud, device_id, agent, v1, v2)


def test_candidate_with_matching_golden_set_is_fetched_tested_and_served(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    golden = golden_for(demo_models["digits-v2"], load_digits_split())
    run(_matching(make_fleet({JETSON: 1}), demo_models, golden))


async def _matching(fleet: Fleet, models: dict[str, DemoModel], golden: GoldenSet) -> None:
    async with serving_v1(fleet, models) as scene:
        ref = await scene.publish_golden(golden)
        checked = scene.v2.model_copy(update={"golden": ref})
        await scene.offer(checked)

        report = await scene.verdict()
        assert report.verdict is Verdict.HEALTHY, report.reasons
        assert report.release == checked.release_id
        applied = await scene.event(EventKind.UPDATE_APPLIED, checked)
        assert applied.detail == f"serving {checked.release_id}"
        assert scene.agent.active_release == checked
        # Both artifacts came over the broker, the golden set to its own file.
        assert scene.golden_file(ref).read_bytes() == encode(golden)
        assert not [e for e in scene.wire.events if e.kind is EventKind.ARTIFACT_REJECTED]
        assert scene.agent.stage is Stage.SERVING


def test_candidate_failing_its_golden_set_is_refused_and_v1_keeps_serving(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    golden = golden_for(demo_models["digits-v2"], load_digits_split())
    label = np.array(golden.cases[2].outputs[LABEL_OUTPUT].array())
    label[0] = (label[0] + 1) % 10
    wrong = with_output(golden, 2, LABEL_OUTPUT, Tensor.of(label))
    run(_mismatching(make_fleet({JETSON: 1}), demo_models, wrong))


async def _mismatching(fleet: Fleet, models: dict[str, DemoModel], wrong: GoldenSet) -> None:
    async with serving_v1(fleet, models) as scene:
        ref = await scene.publish_golden(wrong)
        checked = scene.v2.model_copy(update={"golden": ref})
        await scene.offer(checked)

        report = await scene.verdict()
        assert report.verdict is Verdict.UNHEALTHY
        assert report.reasons == (Reason.SELF_TEST_FAILED.value,)
        assert report.release == checked.release_id
        rejected = await scene.event(EventKind.ARTIFACT_REJECTED, checked)
        assert rejected.reason == Reason.SELF_TEST_FAILED.value
        assert "case 2: label is" in rejected.detail, rejected.detail
        assert scene.golden_file(ref).read_bytes() == encode(wrong)

        # v1 never stopped serving, and the device says so.
        served = scene.agent.inferences_total
        state = await scene.wire.until(
            lambda: (
                s
                if (s := scene.wire.states.get(scene.device_id)) is not None
                and s.last_rejection is not None
                and s.last_rejection.reason == Reason.SELF_TEST_FAILED.value
                else None
            ),
            what="the device state to report the failed self-test",
        )
        assert state.active_release == scene.v1.release_id
        assert state.target_release == checked.release_id
        await scene.wire.until(
            lambda: scene.agent.inferences_total >= served + 10, what="inference on v1"
        )
        assert scene.agent.active_release == scene.v1
        assert scene.agent.stage is Stage.DEGRADED
        assert not scene.events(EventKind.UPDATE_APPLIED, checked)
