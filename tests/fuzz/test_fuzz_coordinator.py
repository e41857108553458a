"""Hostile input on every topic the coordinator reads, against a live fleet.

The fleet: a real Mosquitto, the coordinator, one live agent (``jetson-000``) and two
enrolled devices without an agent (``jetson-001``, ``intel-000``) whose certificates
publish hostile reports on their own topics. An INTEL rollout is kept live in its wave
so that health reports reach the rollout logic (issue 7's first crash was there).
Each hypothesis example publishes a batch; after it the coordinator must still be
alive, log no traceback, answer a fresh spec and take a genuine state report, and the
agent must still infer. At the end a genuine rollout must complete through it all.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from dataclasses import dataclass, field

import pytest
from hypothesis import strategies as st

from edgefleet.compose import start_rollout
from edgefleet.fleet import Fleet
from edgefleet.home import COORDINATOR, OPERATOR
from models import DemoModel
from schemas import (
    MANIFEST_KIND,
    OFFLINE,
    ONLINE,
    ROLLOUT_SPEC_KIND,
    TRUST_KIND,
    Desired,
    DeviceState,
    HealthReport,
    Manifest,
    Mode,
    Phase,
    Role,
    RolloutStatus,
    Verdict,
    encode,
    seal,
    topics,
)
from schemas.topics import DeviceChannel
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
    release_id,
    roll_out,
    run,
    signed_spec,
    spec_for,
)

pytestmark = pytest.mark.fuzz

AGENT = "jetson-000"
GHOSTS = ("jetson-001", "intel-000")
CHECK_TIMEOUT_S = 60.0
SETTLE_S = 1.0


@dataclass
class Live:
    """What the strategies aim at: the fleet's live names and keys."""

    fleet: Fleet
    model: DemoModel
    keys: Keys
    rollout: str = ""
    """The INTEL rollout kept in its wave for health reports to land on."""
    counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    pool: tuple[str, ...] = tuple(hashlib.sha256(bytes([i])).hexdigest() for i in range(4))

    def rollout_id(self) -> str:
        return self.rollout

    @property
    def release(self) -> str:
        return release_id(self.model)


def batches(live: Live, size: int) -> st.SearchStrategy[list[Sample]]:
    keys = live.keys
    # A few digests shared by the specs and the artifact topics of every batch: a spec
    # makes the coordinator fetch one, and the junk retained under it feeds that fetch.
    shas = st.one_of(st.sampled_from(live.pool), st.just(live.model.sha256), fz.sha256s())
    rollout_ids = st.one_of(fz.names(), st.builds(live.rollout_id))
    maybe_rollout = st.one_of(st.none(), rollout_ids)
    releases = st.one_of(st.just(live.release), fz.text())
    class_sets = st.one_of(
        st.just((JETSON,)),
        st.just((INTEL,)),
        st.just((JETSON, INTEL)),
        fz.names().map(lambda n: (n,)),
        fz.names().map(lambda n: tuple(f"{i:02d}{n}"[:64] for i in range(64))),
    )

    @st.composite
    def device_sample(draw: st.DrawFn) -> Sample:
        account = draw(st.sampled_from((*GHOSTS, COORDINATOR)))
        device_id = draw(fz.names()) if account == COORDINATOR else account
        ids = st.one_of(st.just(device_id), st.just(device_id), fz.names())
        channel = draw(st.sampled_from(DeviceChannel))
        valid: st.SearchStrategy[bytes]
        match channel:
            case DeviceChannel.PRESENCE:
                valid = st.sampled_from((ONLINE, OFFLINE))
            case DeviceChannel.STATE:
                valid = fz.encoded(fz.device_states(ids))
            case DeviceChannel.HEALTH:
                valid = fz.encoded(fz.health_reports(ids, maybe_rollout, releases))
            case DeviceChannel.TELEMETRY:
                valid = fz.encoded(fz.telemetry(ids))
            case DeviceChannel.EVENTS:
                valid = fz.encoded(fz.events(ids))
        retain = channel not in (DeviceChannel.TELEMETRY, DeviceChannel.EVENTS)
        topic = topics.device(device_id, channel)
        payload = draw(fz.hostile(valid))
        return Sample(account, topic, payload[0], retain, f"{channel.value}, {payload[1]}")

    @st.composite
    def spec_sample(draw: st.DrawFn) -> Sample:
        rollout_id = draw(rollout_ids)
        body_id = draw(st.one_of(st.just(rollout_id), st.just(rollout_id), fz.names()))
        specs = fz.rollout_specs(st.just(body_id), class_sets, st.sampled_from(Desired), shas)
        signed = fz.sealed(ROLLOUT_SPEC_KIND, specs, [keys.operator, keys.operator, keys.manifest])
        payload = draw(fz.hostile(signed))
        return Sample(
            OPERATOR, topics.rollout_spec(rollout_id), payload[0], True, f"spec, {payload[1]}"
        )

    @st.composite
    def cloud_sample(draw: st.DrawFn) -> Sample:
        """What only the coordinator's account may write: a leaked password's reach."""
        where = draw(
            st.sampled_from(("status", "trust", "manifest", "meta", "chunk", "presence", "fence"))
        )
        valid: st.SearchStrategy[bytes]
        if where == "status":
            rollout_id = draw(rollout_ids)
            topic = topics.rollout_status(rollout_id)
            valid = fz.encoded(fz.rollout_statuses(st.just(rollout_id)))
        elif where == "trust":
            topic = topics.trust()
            trust_docs = fz.trust_docs(keys, fz.ints(1))
            valid = fz.sealed(TRUST_KIND, trust_docs, [keys.root, keys.root, keys.manifest])
        elif where == "manifest":
            hw_class = draw(st.sampled_from((JETSON, INTEL, draw(fz.names()))))
            topic = topics.class_manifest(hw_class)
            seqs = fz.field_ints(Manifest, "seq")
            # The live agent's class gets nothing it must take (a manifest signed by the
            # manifest key and newer is an order, not an attack): another class inside,
            # or expired. Classes without an agent get anything.
            if hw_class != JETSON:
                docs = fz.manifests(st.just(hw_class), seqs, fz.floats(), shas)
            elif draw(st.booleans()):
                other = st.sampled_from((INTEL, draw(fz.names())))
                docs = fz.manifests(other, seqs, fz.floats(), shas)
            else:
                expired = st.sampled_from((0.0, -1.0, time.time() - 1))
                docs = fz.manifests(st.just(JETSON), seqs, expired, shas)
            valid = fz.sealed(MANIFEST_KIND, docs, [keys.manifest, keys.manifest, keys.operator])
        elif where in ("meta", "chunk"):
            sha = draw(shas)
            staged = draw(st.booleans())
            if where == "meta":
                topic = topics.staging_meta(sha) if staged else topics.artifact_meta(sha)
                valid = fz.encoded(fz.artifact_metas(st.one_of(st.just(sha), fz.sha256s())))
            else:
                index = draw(st.sampled_from((0, 1, 3071, 3072, 999_999_999)))
                topic = (
                    topics.staging_chunk(sha, index)
                    if staged
                    else topics.artifact_chunk(sha, index)
                )
                valid = st.one_of(fz.pick(fz.CHUNKS), st.binary(max_size=64))
            account = OPERATOR if staged else COORDINATOR
            payload = draw(fz.hostile(valid))
            return Sample(account, topic, payload[0], True, f"{where}, {payload[1]}")
        elif where == "fence":
            # A fence that is not this process's own for this connection settles nothing.
            topic = topics.coordinator_fence()
            valid = st.one_of(st.binary(max_size=64), st.just(b"0" * 32 + b"/1"))
        else:
            topic = topics.coordinator_presence()
            valid = st.sampled_from((ONLINE, OFFLINE))
        payload = draw(fz.hostile(valid))
        retain = where != "fence" or draw(st.booleans())
        return Sample(COORDINATOR, topic, payload[0], retain, f"{where}, {payload[1]}")

    return st.lists(
        st.one_of(device_sample(), device_sample(), spec_sample(), cloud_sample()),
        min_size=1,
        max_size=size,
    )


def issue7_attacks(live: Live) -> list[Sample]:
    """Issue 7's own two crashes, replayed before anything random."""
    now = time.time()
    long_reasons = HealthReport(
        report_id="issue7-long-reasons",
        device_id="intel-000",
        rollout_id=live.rollout,
        manifest_seq=1,
        release=live.release,
        verdict=Verdict.UNHEALTHY,
        reasons=tuple(f"{i:02d}" + "r" * 198 for i in range(16)),
        inferences=0,
        errors=0,
        p95_latency_ms=None,
        soak_seconds=0.0,
        at=now,
    )
    unknown = tuple(f"unknown-class-{i:02d}-".ljust(64, "x") for i in range(64))
    spec = spec_for(live.model, rollout_id="issue7-unknown-classes", classes=unknown)
    return [
        Sample(
            "intel-000",
            topics.device("intel-000", DeviceChannel.HEALTH),
            encode(long_reasons),
            True,
            "unhealthy report, 16 reasons of 200 characters, on the live rollout",
        ),
        Sample(
            OPERATOR,
            topics.rollout_spec(spec.id),
            signed_spec(live.fleet.home, spec),
            True,
            "operator-signed spec naming 64 unknown classes of 64 characters",
        ),
    ]


@dataclass
class Checker:
    live: Live
    services: Services
    publishers: Publishers
    wire: Wire
    crashes: Crashes
    seen: int = 0

    alarms: tuple[str, ...] = ()
    """Texts of errors the coordinator may log about the batch itself (see ``Crashes``)."""

    def problems(self) -> list[str]:
        return self.services.dead() + self.crashes.since(self.seen, alarms=self.alarms)

    async def until(self, probe: object, what: str) -> None:
        """Wait for ``probe()``; fail at once when a service died meanwhile."""
        assert callable(probe)
        await self.wire.until(
            lambda: self.problems() or probe(), what=what, timeout=CHECK_TIMEOUT_S
        )

    async def ensure_rollout(self) -> None:
        """An INTEL rollout in its wave, with ``intel-000`` online in it."""
        ghost = "intel-000"
        await self.publishers.publish(
            Sample(ghost, topics.device(ghost, DeviceChannel.PRESENCE), ONLINE, True, "genuine")
        )
        await self.publishers.publish(self._genuine_state(ghost, INTEL))
        status = self.status(self.live.rollout)
        if status is not None and not status.phase.final:
            return
        for _ in range(5):  # a hostile spec may hold INTEL while it fails to validate
            rollout_id = f"health-{next(self.live.counter)}"
            self.live.rollout = rollout_id
            spec = spec_for(
                self.live.model,
                rollout_id=rollout_id,
                classes=(INTEL,),
                wave_timeout_s=3600.0,
                success_ratio=1.0,
                max_failure_ratio=0.0,
            )
            operator = await self.publishers.session(OPERATOR)
            await operator.publish(
                topics.rollout_spec(rollout_id),
                signed_spec(self.live.fleet.home, spec),
                retain=True,
            )
            await self.until(
                lambda rid=rollout_id: (
                    (s := self.status(rid)) is not None and s.phase is not Phase.PAUSED
                ),
                f"rollout {rollout_id} to be admitted or rejected",
            )
            status = self.status(rollout_id)
            if status is not None and status.phase is Phase.WAVE:
                return
            await asyncio.sleep(1.0)
        msg = f"no INTEL rollout could be started: {self.status(self.live.rollout)}"
        raise AssertionError(msg)

    def status(self, rollout_id: str) -> RolloutStatus | None:
        history = self.wire.statuses.get(rollout_id)
        return history[-1] if history else None

    def _genuine_state(self, device_id: str, hw_class: str) -> Sample:
        state = DeviceState(
            device_id=device_id,
            hw_class=hw_class,
            mode=Mode.IDLE,
            active_release=None,
            active_sha256=None,
            target_release=None,
            rollout_id=None,
            applied_seq=0,
            trust_version=1,
            inferences_total=next(self.live.counter),
            last_inference_at=None,
            last_rejection=None,
            updated_at=time.time(),
        )
        return Sample(
            device_id, topics.device(device_id, DeviceChannel.STATE), encode(state), True, "genuine"
        )

    async def after(self, batch: list[Sample]) -> None:
        """Every service alive and working after ``batch``."""
        # Specs are handled in tasks of their own and rollouts decided on ticks: give
        # both the time to act on the batch before judging it.
        await asyncio.sleep(SETTLE_S)
        problems = self.problems()
        if not problems:
            try:
                await self._working()
            except AssertionError as exc:
                problems = [str(exc)]
            problems = [*self.problems(), *problems]
        self.seen = len(self.crashes.records)
        assert not problems, failure("the fleet did not survive a batch", batch, problems)

    async def _working(self) -> None:
        agent = self.live.fleet.agents[AGENT]
        served = agent.inferences_total
        # The coordinator answers a fresh spec (an aborted one: no fetch, no claim).
        probe = f"probe-{next(self.live.counter)}"
        spec = spec_for(
            self.live.model, rollout_id=probe, classes=(JETSON,), desired=Desired.ABORTED
        )
        operator = await self.publishers.session(OPERATOR)
        await operator.publish(
            topics.rollout_spec(probe), signed_spec(self.live.fleet.home, spec), retain=True
        )
        await self.until(lambda: self.wire.final_status(probe), f"a status for {probe}")
        # It takes a genuine report.
        ghost = "jetson-001"
        genuine = self._genuine_state(ghost, JETSON)
        await self.publishers.publish(genuine)
        coordinator = self.live.fleet.coordinator
        assert coordinator is not None
        await self.until(
            lambda: (
                (view := coordinator.fleet.devices.get(ghost)) is not None
                and view.state is not None
                and encode(view.state) == genuine.payload
            ),
            "the coordinator to take a genuine state report",
        )
        await self.until(lambda: agent.inferences_total >= served + 5, "the agent to infer")


def test_coordinator_survives_hostile_input_on_every_topic(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 2, INTEL: 1})
    run(_fuzz(fleet, demo_models))


async def _fuzz(fleet: Fleet, demo_models: dict[str, DemoModel]) -> None:
    home = fleet.home
    live = Live(
        fleet,
        demo_models["digits-v1"],
        Keys(home.key(Role.ROOT), home.key(Role.MANIFEST), home.key(Role.OPERATOR)),
    )
    services = Services(fleet)
    publishers = Publishers(fleet)
    await add_fuzz_accounts(fleet)
    with watching() as crashes:
        try:
            async with Wire.open(home) as wire:
                services.start_coordinator(artifact_timeout_s=3.0)
                services.start_agent(AGENT)
                operator = await publishers.session(OPERATOR)
                await roll_out(
                    operator, fleet, wire, live.model, rollout_id="install-v1", classes=(JETSON,)
                )
                check = Checker(live, services, publishers, wire, crashes)
                await check.ensure_rollout()
                attacks = issue7_attacks(live)
                await publishers.publish_all(attacks)
                await check.after(attacks)
                await check.ensure_rollout()
                await _hypothesis(live, check, publishers)
                await _restart_over_the_debris(live, check)
                await _genuine_rollout(live, check, demo_models["digits-v2"])
                assert not check.problems(), "\n".join(check.problems())
        finally:
            await publishers.close()
            await services.close()


async def _hypothesis(live: Live, check: Checker, publishers: Publishers) -> None:
    bridge = Bridge(asyncio.get_running_loop())

    async def one(batch: list[Sample]) -> None:
        await publishers.publish_all(batch)
        await check.after(batch)
        # Before the next batch is drawn: the batch aims at the rollout that is live.
        await check.ensure_rollout()

    await asyncio.to_thread(
        drive, batches(live, 16), lambda batch: bridge.call(one(batch)), ci_examples=4
    )


async def _restart_over_the_debris(live: Live, check: Checker) -> None:
    """A coordinator starting over whatever the fuzz left retained (specs, statuses,
    artifacts, staging), and over a manifest signed with the manifest key at the highest
    seq the schema allows, published while it was down, must start and work: nothing it
    reads back may crash it again on every start."""
    now = time.time()
    seq = fz.highest(Manifest, "seq") or 2**64 - 1
    top = Manifest(hw_class=INTEL, seq=seq, issued_at=now, expires_at=now + 3600, stable=None)
    batch = [
        Sample(
            COORDINATOR,
            topics.class_manifest(INTEL),
            seal(MANIFEST_KIND, encode(top), [live.keys.manifest]),
            True,
            f"manifest signed by the manifest key at the highest seq, {seq}",
        )
    ]
    await check.services.stop(COORDINATOR)
    await check.publishers.publish_all(batch)  # while it is down: nobody puts it right
    check.services.start_coordinator(artifact_timeout_s=3.0)
    # A seq that leaves no room above it is an alarm worth an error (the manifest key
    # signed it): one that names the seq, not a crash.
    check.alarms = (str(seq),)
    try:
        await check.after(batch)
    finally:
        check.alarms = ()


async def _genuine_rollout(live: Live, check: Checker, model: DemoModel) -> None:
    """After it all, a real rollout still goes through: the live INTEL rollout is
    aborted, the devices without an agent go offline (the wave must not wait for them),
    and ``model`` rolls out to the live agent's class, which then serves it."""
    fleet = live.fleet
    operator = await check.publishers.session(OPERATOR)
    if (status := check.status(live.rollout)) is not None and not status.phase.final:
        abort = spec_for(
            live.model,
            rollout_id=live.rollout,
            classes=(INTEL,),
            generation=2**40,
            desired=Desired.ABORTED,
        )
        await operator.publish(
            topics.rollout_spec(live.rollout), signed_spec(fleet.home, abort), retain=True
        )
        await check.until(lambda: check.wire.final_status(live.rollout), "the abort")
    for ghost in GHOSTS:
        presence = topics.device(ghost, DeviceChannel.PRESENCE)
        await check.publishers.publish(Sample(ghost, presence, OFFLINE, True, "genuine"))
    rollout_id = "after-fuzz"
    await start_rollout(
        operator,
        fleet.home,
        model.path,
        rollout_id=rollout_id,
        classes=(JETSON,),
        waves=(100.0,),
        profiles=fleet.class_profiles(),
    )
    try:
        await check.until(lambda: check.wire.final_status(rollout_id), "a genuine rollout")
    except AssertionError as exc:
        msg = f"{exc}; last status {check.status(rollout_id)}"
        raise AssertionError(msg) from exc
    final = check.status(rollout_id)
    assert final is not None
    assert final.phase is Phase.COMPLETED, final
    agent = fleet.agents[AGENT]
    assert agent.active_release is not None
    assert agent.active_release.release_id == release_id(model)
