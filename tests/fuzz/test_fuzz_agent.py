"""Hostile input on every topic an agent reads, against two live agents.

No coordinator runs here: the test is the cloud (on the coordinator's account, the
one allowed to write what devices read), so that it decides the manifest seq and can
keep a fetch open for the fuzz to feed. Each example first points the agents at a
fresh build of the model that is not on the broker yet, so they sit subscribed to its
artifact topics; then a batch of hostile trust documents (root-signed ones among
them), manifests (signed with the manifest key among them) and artifact metas and
chunks goes out. After it both agents must be alive, log no traceback, still infer,
install that build as soon as its genuine bytes arrive, and take the next genuine
manifest.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import uuid
from dataclasses import dataclass, field

import onnx
import pytest
from hypothesis import strategies as st

from agent.lifecycle import Stage
from edgefleet.fleet import Fleet
from edgefleet.home import COORDINATOR
from models import DemoModel
from schemas import (
    MANIFEST_KIND,
    TRUST_KIND,
    ArtifactMeta,
    ArtifactRef,
    Manifest,
    Release,
    Role,
    encode,
    split_artifact,
    topics,
)
from tests.fuzz import strategies as fz
from tests.fuzz.harness import (
    Bridge,
    Crashes,
    Publishers,
    Services,
    add_fuzz_accounts,
    drive,
    failure,
    watching,
)
from tests.fuzz.strategies import Keys, Sample
from tests.integration.fleetkit import (
    INTEL,
    JETSON,
    MakeFleet,
    Wire,
    manifest,
    profiles,
    publish_fetchable,
    release_for,
    run,
    sign,
)

pytestmark = pytest.mark.fuzz

AGENTS = ("jetson-000", "jetson-001")
CHECK_TIMEOUT_S = 30.0
SEQ_ROOM = 1000
"""Seqs of manifests an agent may take stay this far below the schema's highest, so a
genuine one can follow."""


def rebuild(model: bytes) -> bytes:
    """The same model with another digest (a fresh doc string): a build no agent has."""
    proto = onnx.load_from_string(model)
    proto.doc_string = f"fuzz build {uuid.uuid4().hex}"
    return bytes(proto.SerializeToString())


@dataclass
class Target:
    """The build the agents are fetching while a batch goes out."""

    data: bytes
    release: Release

    @property
    def sha256(self) -> str:
        return self.release.artifact.sha256


@dataclass
class Cloud:
    fleet: Fleet
    model: DemoModel
    keys: Keys
    publishers: Publishers
    crashes: Crashes
    services: Services
    wire: Wire
    base: Release
    seq: int = 0
    target: Target | None = None
    seen: int = 0
    counter: itertools.count[int] = field(default_factory=itertools.count)

    def target_sha(self) -> str:
        return self.base.artifact.sha256 if self.target is None else self.target.sha256

    def next_seq(self) -> int:
        return self.applied() + 1

    def applied(self) -> int:
        return max(self.fleet.agents[a].applied_seq for a in AGENTS)

    def problems(self) -> list[str]:
        return self.services.dead() + self.crashes.since(self.seen)

    async def until(self, probe: object, what: str) -> None:
        assert callable(probe)
        await self.wire.until(
            lambda: self.problems() or probe(), what=what, timeout=CHECK_TIMEOUT_S
        )

    async def send_manifest(self, release: Release) -> int:
        seq = self.next_seq()
        payload = sign(manifest(JETSON, seq, release), self.keys.manifest)
        await self.publishers.publish(
            Sample(COORDINATOR, topics.class_manifest(JETSON), payload, True, "genuine")
        )
        return seq

    async def aim(self) -> None:
        """Point the agents at a fresh build that is not published yet."""
        data = await asyncio.to_thread(rebuild, self.model.path.read_bytes())
        ref = ArtifactRef(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
        self.target = Target(data, self.base.model_copy(update={"artifact": ref}))
        await self.send_manifest(self.target.release)
        agents = [self.fleet.agents[a] for a in AGENTS]
        await self.until(
            lambda: all(a.stage is Stage.FETCHING for a in agents), "the agents to fetch"
        )

    async def after(self, batch: list[Sample]) -> None:
        problems = self.problems()
        if not problems:
            try:
                await self._working()
            except AssertionError as exc:
                problems = [str(exc)]
            problems = [*self.problems(), *problems]
        self.seen = len(self.crashes.records)
        assert not problems, failure("the agents did not survive a batch", batch, problems)

    async def _working(self) -> None:
        """The genuine bytes arrive: both agents install the build they were fetching
        (junk seen meanwhile is no verdict, issue 7 rule 5), and take the next genuine
        manifest."""
        target = self.target
        assert target is not None
        agents = [self.fleet.agents[a] for a in AGENTS]
        served = [a.inferences_total for a in agents]

        def installed() -> bool:
            return all(
                a.stage is Stage.SERVING
                and a.active_release is not None
                and a.active_release.artifact == target.release.artifact
                for a in agents
            )

        cloud = await self.publishers.session(COORDINATOR)
        await publish_fetchable(cloud, target.data, name="fuzz-build")
        await self.until(installed, f"both agents to install {target.release.release_id}")
        seq = await self.send_manifest(target.release)
        await self.until(
            lambda: installed() and all(a.applied_seq >= seq for a in agents),
            f"both agents to take the genuine manifest seq {seq}",
        )
        await self.until(
            lambda: all(a.inferences_total >= n + 5 for a, n in zip(agents, served, strict=True)),
            "the agents to infer",
        )


def batches(cloud: Cloud, size: int) -> st.SearchStrategy[list[Sample]]:
    keys = cloud.keys
    target = st.builds(cloud.target_sha)
    shas = st.one_of(target, target, fz.sha256s())
    any_seq = fz.field_ints(Manifest, "seq")
    ceiling = (fz.highest(Manifest, "seq") or 2**53) - SEQ_ROOM
    own_seq = st.one_of(fz.field_ints(Manifest, "seq", hi=ceiling), st.builds(cloud.next_seq))

    trust = fz.samples(
        COORDINATOR,
        topics.trust(),
        fz.hostile(
            fz.sealed(TRUST_KIND, fz.trust_docs(keys, fz.ints(1)), [keys.root, keys.manifest])
        ),
        retain=True,
        label="trust",
    )
    # Manifests of the agents' class with a seq it may take, and of any class at all
    # with any seq (taken by no one: another class, or a replay).
    own = fz.manifests(st.just(JETSON), own_seq, fz.floats(), shas)
    other = fz.manifests(st.sampled_from((INTEL, "a")), any_seq, fz.floats(), shas)
    manifests = fz.samples(
        COORDINATOR,
        topics.class_manifest(JETSON),
        fz.hostile(
            fz.sealed(
                MANIFEST_KIND,
                st.one_of(own, other),
                [keys.manifest, keys.manifest, keys.operator],
            )
        ),
        retain=True,
        label="manifest",
    )

    @st.composite
    def artifact(draw: st.DrawFn) -> Sample:
        sha = draw(shas)
        if draw(st.booleans()):
            topic = topics.artifact_meta(sha)
            genuine = st.builds(lambda: encode(_genuine_meta(cloud)))
            valid = st.one_of(
                genuine, fz.encoded(fz.artifact_metas(st.one_of(st.just(sha), fz.sha256s())))
            )
        else:
            index = draw(st.sampled_from((0, 1, 3071, 3072, 999_999_999)))
            topic = topics.artifact_chunk(sha, index)
            valid = st.builds(lambda: cloud.target.data if cloud.target else b"")
        payload = draw(fz.hostile(valid))
        return Sample(COORDINATOR, topic, payload[0], True, f"artifact, {payload[1]}")

    return st.lists(st.one_of(trust, manifests, artifact(), artifact()), min_size=1, max_size=size)


def _genuine_meta(cloud: Cloud) -> ArtifactMeta:
    target = cloud.target
    assert target is not None
    return split_artifact(target.data, name="fuzz-build")[0]


def test_agents_survive_hostile_trust_manifests_and_artifacts(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 2})
    run(_fuzz(fleet, demo_models["digits-v1"]))


async def _fuzz(fleet: Fleet, model: DemoModel) -> None:
    home = fleet.home
    keys = Keys(home.key(Role.ROOT), home.key(Role.MANIFEST), home.key(Role.OPERATOR))
    services = Services(fleet)
    publishers = Publishers(fleet)
    await add_fuzz_accounts(fleet)
    with watching() as crashes:
        try:
            async with Wire.open(home) as wire:
                for device_id in AGENTS:
                    services.start_agent(device_id)
                cloud_session = await publishers.session(COORDINATOR)
                await cloud_session.publish(topics.trust(), home.trust(), retain=True)
                base = release_for(model, profiles(fleet)[JETSON])
                cloud = Cloud(fleet, model, keys, publishers, crashes, services, wire, base)
                await cloud.aim()
                await _hypothesis(cloud)
        finally:
            await publishers.close()
            await services.close()


async def _hypothesis(cloud: Cloud) -> None:
    bridge = Bridge(asyncio.get_running_loop())

    async def one(batch: list[Sample]) -> None:
        await cloud.publishers.publish_all(batch)
        await cloud.after(batch)
        # Aimed before the next batch is drawn: the batch aims at the build in flight.
        await cloud.aim()

    await asyncio.to_thread(
        drive, batches(cloud, 12), lambda batch: bridge.call(one(batch)), ci_examples=2
    )
