"""The agent service itself, with real parts and no broker: an enrolled device (real
keys, bundle, TLS files) whose broker is not there, real models in its artifact store,
manifests and trust signed with the home's keys and handed to the agent's message
handler, real SQLite and TinyDB stores. Checks what the agent does and stores."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from agent import Agent, AgentConfig, Bundle, Feed
from agent.artifacts import ArtifactKind, ArtifactStore
from agent.events import Desired, EngineEvent, FailedRelease, StorageFailed, StorageOk
from agent.journal import Journal
from agent.lifecycle import Stage
from agent.limits import Limits
from agent.outbox import EVENT, Outbox
from agent.persistence import StateKeeper
from agent.runtime import InferenceResult
from agent.store import AgentStore
from broker.config import BrokerPorts
from broker.launcher import free_ports
from broker.session import Message
from edgefleet.home import Home
from models import INPUT_NAME, DemoModel, DigitsSplit, DigitsStream
from schemas import (
    MANIFEST_KIND,
    TRUST_KIND,
    ArtifactRef,
    Event,
    EventKind,
    KeyPair,
    Manifest,
    Reason,
    Release,
    Role,
    TelemetrySummary,
    Verdict,
    decode,
    encode,
    seal,
    topics,
)
from schemas.artifact import split_artifact
from schemas.envelope import public_raw
from schemas.manifest import RolloutCohort
from schemas.trust import RoleKeys, TrustDoc
from tests.agent import parts
from tests.agent.conftest import release_of
from tests.agent.goldens import golden_for
from tests.agent.parts import fetching, tally

HW_CLASS = "jetson-vision-standard"
DEVICE = "jetson-000"
GUARD_S = 30.0
"""A hang guard only; nothing here measures speed."""


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Home:
    """A fleet home with one enrolled device, pointing at ports where no broker runs."""
    devices, services, websockets = free_ports(3)
    ports = BrokerPorts(devices=devices, services=services, websockets=websockets)
    home = Home.init(tmp_path_factory.mktemp("home") / "home", ports=ports)
    home.enroll(DEVICE, HW_CLASS)
    return home


class Camera:
    """A device's input source: real digits, and like many camera drivers usable from
    one thread only. ``fail_every`` makes every n-th frame fail."""

    def __init__(self, *, fail_every: int = 0) -> None:
        self._frames: Iterator[np.ndarray] = iter(DigitsStream(seed=7))
        self._thread: int | None = None
        self._fail_every = fail_every
        self.calls = 0
        self.wrong_thread = 0

    def __call__(self) -> Feed:
        self.calls += 1
        me = threading.get_ident()
        if self._thread is None:
            self._thread = me
        if me != self._thread:
            self.wrong_thread += 1
            msg = "camera used from a second thread"
            raise RuntimeError(msg)
        if self._fail_every and self.calls % self._fail_every == 0:
            msg = "frame grab failed"
            raise OSError(msg)
        return {INPUT_NAME: np.asarray(next(self._frames), dtype=np.float32)}


def config(data_dir: Path, **changes: object) -> AgentConfig:
    base = AgentConfig(
        data_dir=data_dir,
        inference_hz=100.0,
        telemetry_window_s=0.2,
        state_interval_s=1.0,
        reconnect_s=0.2,
        fetch_timeout_s=5.0,
        retry_s=0.2,
        retry_max_s=1.0,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def make(home: Home, data_dir: Path, source: Camera | None = None, **changes: object) -> Agent:
    bundle_dir = home.root / "devices" / DEVICE
    return Agent(
        Bundle.load(bundle_dir), bundle_dir, config(data_dir, **changes), source or Camera()
    )


def stock(data_dir: Path, *models: DemoModel) -> None:
    """Put model files in the agent's artifact store, as an earlier fetch would have."""
    folder = data_dir / "artifacts" / "models"
    folder.mkdir(parents=True, exist_ok=True)
    for model in models:
        shutil.copyfile(model.path, folder / f"{model.sha256}.onnx")


def signed(
    home: Home,
    seq: int,
    stable: Release | None,
    candidate: Release | None = None,
    *,
    rollout_id: str = "r1",
    key: KeyPair | None = None,
) -> bytes:
    now = time.time()
    rollout = (
        None
        if candidate is None
        else RolloutCohort(
            id=rollout_id, candidate=candidate, salt=rollout_id, cutoff_bp=0, canaries=(DEVICE,)
        )
    )
    doc = Manifest(
        hw_class=HW_CLASS,
        seq=seq,
        issued_at=now,
        expires_at=now + 3600,
        stable=stable,
        rollout=rollout,
    )
    return seal(MANIFEST_KIND, encode(doc), [key or home.key(Role.MANIFEST)])


def retained(topic: str, payload: bytes) -> Message:
    return Message(topic=topic, payload=payload, retain=True, qos=1)


async def deliver(agent: Agent, topic: str, payload: bytes) -> None:
    """Hand a retained message to the agent as its dispatcher does."""
    await agent.receive(retained(topic, payload))


async def deliver_manifest(agent: Agent, payload: bytes) -> None:
    await deliver(agent, topics.class_manifest(HW_CLASS), payload)


async def until(probe: Callable[[], object], what: str, task: asyncio.Task[None]) -> None:
    deadline = time.monotonic() + GUARD_S
    while not probe():
        if task.done():
            await task  # the agent died: raise why
            pytest.fail(f"the agent stopped while waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(agent.run())
    try:
        await until(agent.ready.is_set, "the state restored", task)
        yield task
    finally:
        task.cancel()
        await asyncio.wait({task})
    if not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]


def events(data_dir: Path) -> list[Event]:
    """The events queued in the agent's outbox (none before the agent created it)."""
    try:
        db = sqlite3.connect(f"file:{data_dir / 'outbox.sqlite'}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT payload FROM outbox WHERE kind = ? ORDER BY id", (EVENT,))
            return [decode(bytes(r[0]), Event) for r in rows.fetchall()]
        finally:
            db.close()
    except sqlite3.OperationalError:
        return []  # not there yet, or its table is being made: the caller polls


async def serving(agent: Agent, task: asyncio.Task[None], release: Release) -> None:
    await until(
        lambda: agent.stage is Stage.SERVING and agent.active_release == release,
        f"{release.release_id} served",
        task,
    )


def verdict_on(agent: Agent, rollout_id: str) -> bool:
    report = agent.last_health
    return report is not None and report.rollout_id == rollout_id


def with_budget(release: Release, **changes: float) -> Release:
    return release.model_copy(update={"health": release.health.model_copy(update=changes)})


@pytest.fixture
def v1(demo_models: dict[str, DemoModel]) -> Release:
    return release_of(demo_models["digits-v1"])


@pytest.fixture
def v2(demo_models: dict[str, DemoModel]) -> Release:
    # A soak long enough to publish a manifest in the middle of it.
    return with_budget(release_of(demo_models["digits-v2"]), soak_seconds=1.0)


# -- 1: a re-signed manifest never supersedes work ----------------------------------------


def test_resigned_manifest_does_not_cancel_a_soak_in_flight(
    home: Home, tmp_path: Path, demo_models: dict[str, DemoModel], v1: Release, v2: Release
) -> None:
    stock(tmp_path, demo_models["digits-v1"], demo_models["digits-v2"])
    agent = make(home, tmp_path)

    async def scenario() -> None:
        async with running(agent) as task:
            await deliver(agent, topics.trust(), home.trust())
            await deliver_manifest(agent, signed(home, 1, v1))
            await serving(agent, task, v1)
            await deliver_manifest(agent, signed(home, 2, v1, v2))
            await until(lambda: agent.stage is Stage.SOAKING, "the candidate's soak", task)
            # The coordinator re-signs: same content, next seq.
            await deliver_manifest(agent, signed(home, 3, v1, v2))
            assert agent.applied_seq == 3
            assert agent.stage is Stage.SOAKING
            await until(lambda: verdict_on(agent, "r1"), "a verdict on the candidate", task)
            await serving(agent, task, v2)
            report = agent.last_health
            assert report is not None
            assert report.verdict is Verdict.HEALTHY
            assert report.release == v2.release_id
            assert report.rollout_id == "r1"

    asyncio.run(scenario())


def test_candidate_promoted_to_stable_during_its_soak_finishes_that_soak(
    home: Home, tmp_path: Path, demo_models: dict[str, DemoModel], v1: Release, v2: Release
) -> None:
    """The rollout completes while this device still soaks v2: v2 is now the stable
    release, so the soak goes on and v2 stays, instead of a swap back and a second soak."""
    stock(tmp_path, demo_models["digits-v1"], demo_models["digits-v2"])
    agent = make(home, tmp_path)

    async def scenario() -> None:
        async with running(agent) as task:
            await deliver(agent, topics.trust(), home.trust())
            await deliver_manifest(agent, signed(home, 1, v1))
            await serving(agent, task, v1)
            await deliver_manifest(agent, signed(home, 2, v1, v2))
            await until(lambda: agent.stage is Stage.SOAKING, "the candidate's soak", task)
            await deliver_manifest(agent, signed(home, 3, v2))
            assert agent.stage is Stage.SOAKING
            assert agent.active_release == v2
            await until(lambda: verdict_on(agent, "r1"), "a verdict on the candidate", task)
            await serving(agent, task, v2)

    asyncio.run(scenario())


def test_a_real_change_during_a_soak_puts_the_previous_model_back(
    home: Home, tmp_path: Path, demo_models: dict[str, DemoModel], v1: Release, v2: Release
) -> None:
    """A new rollout supersedes the soak of v2: v1 is served again at once, so the new
    candidate (too slow, rolled back) falls back to v1, never to the unjudged v2."""
    stock(tmp_path, *demo_models.values())
    slow = release_of(demo_models["digits-v2-slow"])
    agent = make(home, tmp_path)

    async def scenario() -> None:
        async with running(agent) as task:
            await deliver(agent, topics.trust(), home.trust())
            await deliver_manifest(agent, signed(home, 1, v1))
            await serving(agent, task, v1)
            await deliver_manifest(agent, signed(home, 2, v1, v2))
            await until(lambda: agent.stage is Stage.SOAKING, "the v2 soak", task)
            await deliver_manifest(agent, signed(home, 3, v1, slow, rollout_id="r2"))
            await until(
                lambda: agent.stage is not Stage.SOAKING or agent.active_release != v2,
                "the v2 soak to be cut short",
                task,
            )
            assert agent.active_release == v1
            await until(lambda: verdict_on(agent, "r2"), "the slow candidate's verdict", task)
            report = agent.last_health
            assert report is not None
            assert report.verdict is Verdict.UNHEALTHY
            assert agent.active_release == v1
            assert agent.stage is Stage.DEGRADED
            await until(  # the report goes out first, the event after it
                lambda: any(e.kind is EventKind.ROLLBACK for e in events(tmp_path)),
                "the rollback event",
                task,
            )

    asyncio.run(scenario())
    rollback = [e for e in events(tmp_path) if e.kind is EventKind.ROLLBACK]
    assert len(rollback) == 1
    assert rollback[0].detail.endswith(f"back to {v1.release_id}")


# -- 3: a fetch that timed out is retried; stable failures are per seq --------------------


def test_an_agent_stopped_mid_soak_closes_the_record_and_soaks_again_at_its_next_start(
    home: Home, tmp_path: Path, demo_models: dict[str, DemoModel], v1: Release, v2: Release
) -> None:
    """Cancellation (its owner stops it) is no crash: the crash-loop guard stays quiet."""
    stock(tmp_path, demo_models["digits-v1"], demo_models["digits-v2"])
    long_soak = with_budget(v2, soak_seconds=600.0)
    state_file = tmp_path / "state.json"

    async def soaking(agent: Agent, *, fresh: bool) -> None:
        async with running(agent) as task:
            if fresh:
                await deliver(agent, topics.trust(), home.trust())
                await deliver_manifest(agent, signed(home, 1, v1))
                await serving(agent, task, v1)
                await deliver_manifest(agent, signed(home, 2, v1, long_soak))
            # else from the stored manifest
            await until(lambda: agent.stage is Stage.SOAKING, "the candidate's soak", task)
            await until(lambda: AgentStore(state_file).load().soaking, "the record", task)

    first = make(home, tmp_path)
    asyncio.run(soaking(first, fresh=True))
    stored = AgentStore(state_file).load()
    assert (stored.soaking, stored.active, stored.failed) == (None, v1, ())
    again = make(home, tmp_path)
    asyncio.run(soaking(again, fresh=False))
    assert again.last_health == first.last_health, "no crash reported"
    assert again.failed_releases == ()


def test_fetch_timeout_is_retried_not_remembered(
    home: Home, tmp_path: Path, demo_models: dict[str, DemoModel], v1: Release
) -> None:
    agent = make(home, tmp_path, fetch_timeout_s=0.3)

    async def scenario() -> None:
        async with running(agent) as task:
            await deliver(agent, topics.trust(), home.trust())
            await deliver_manifest(agent, signed(home, 1, v1))
            # No broker: the fetch times out.
            await until(
                lambda: any(e.reason == Reason.FETCH_TIMEOUT.value for e in events(tmp_path)),
                "the fetch to time out",
                task,
            )
            # Idle until its retry, which may already be fetching again (0.1-0.2 s on).
            assert agent.stage in (Stage.IDLE, Stage.FETCHING)
            assert agent.failed_releases == ()
            assert agent.last_health is None, "a transient failure is no verdict"
            # The artifact shows up (here: on disk); the retry picks it up by itself.
            stock(tmp_path, demo_models["digits-v1"])
            await serving(agent, task, v1)

    asyncio.run(scenario())


def test_stable_target_that_failed_is_not_tried_again_at_a_resign_only_once_it_changes(
    home: Home, tmp_path: Path, demo_models: dict[str, DemoModel], v1: Release
) -> None:
    stock(tmp_path, demo_models["digits-v1"])
    broken = v1.model_copy(update={"inputs": (v1.inputs[0].model_copy(update={"name": "x"}),)})
    changed = broken.model_copy(
        update={"health": v1.health.model_copy(update={"soak_seconds": 9.0})}
    )
    agent = make(home, tmp_path)

    def load_failures() -> int:
        return sum(e.reason == Reason.MODEL_LOAD_FAILED.value for e in events(tmp_path))

    async def scenario() -> None:
        async with running(agent) as task:
            await deliver(agent, topics.trust(), home.trust())
            await deliver_manifest(agent, signed(home, 1, broken))
            await until(lambda: load_failures() == 1, "the load to fail", task)
            await deliver_manifest(agent, signed(home, 2, broken))
            await asyncio.sleep(0.5)  # a re-sign of the same release: not tried again
            assert load_failures() == 1
            await deliver_manifest(agent, signed(home, 3, changed))
            await until(lambda: load_failures() == 2, "a try of the changed release", task)
            assert agent.stage is Stage.IDLE

    asyncio.run(scenario())
    failed = (
        FailedRelease.of(Desired(broken, None, 1)),
        FailedRelease.of(Desired(changed, None, 3)),
    )
    assert agent.failed_releases == failed
    assert AgentStore(tmp_path / "state.json").load().failed == tuple(f.stored() for f in failed)


# -- golden self-tests: fetched beside the model, judged before the swap ------------------


def golden_ref(payload: bytes) -> ArtifactRef:
    return ArtifactRef(sha256=hashlib.sha256(payload).hexdigest(), size=len(payload))


def stock_golden(data_dir: Path, payload: bytes) -> ArtifactRef:
    """Put a golden set's bytes in the agent's store, as an earlier fetch would have."""
    ref = golden_ref(payload)
    path = ArtifactStore(data_dir / "artifacts").path(ref.sha256, ArtifactKind.GOLDEN)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return ref


@pytest.fixture
def v2_golden(
    demo_models: dict[str, DemoModel], digits_split: DigitsSplit, v2: Release
) -> tuple[Release, bytes]:
    """v2 naming its golden set, and the golden set's bytes."""
    payload = encode(golden_for(demo_models["digits-v2"], digits_split))
    return v2.model_copy(update={"golden": golden_ref(payload)}), payload


def test_golden_fetch_timeout_is_retried_and_the_golden_set_then_passes(
    home: Home,
    tmp_path: Path,
    demo_models: dict[str, DemoModel],
    v1: Release,
    v2_golden: tuple[Release, bytes],
) -> None:
    stock(tmp_path, demo_models["digits-v1"], demo_models["digits-v2"])
    checked, payload = v2_golden
    ref = checked.golden
    assert ref is not None
    agent = make(home, tmp_path, fetch_timeout_s=0.3)

    def timeouts() -> list[Event]:
        return [e for e in events(tmp_path) if e.reason == Reason.FETCH_TIMEOUT.value]

    async def scenario() -> None:
        async with running(agent) as task:
            await deliver(agent, topics.trust(), home.trust())
            await deliver_manifest(agent, signed(home, 1, v1))
            await serving(agent, task, v1)
            await deliver_manifest(agent, signed(home, 2, v1, checked))
            # The model is on disk, its golden set is not, and no broker is there.
            await until(timeouts, "the golden fetch to time out", task)
            assert timeouts()[0].detail.startswith(
                f"golden artifact {ref.sha256[:12]} not fetched within 0.3 s"
            )
            assert agent.active_release == v1
            assert agent.failed_releases == ()
            assert not verdict_on(agent, "r1"), "a transient failure is no verdict"
            assert stock_golden(tmp_path, payload) == ref
            await until(lambda: verdict_on(agent, "r1"), "a verdict on the candidate", task)
            await serving(agent, task, checked)
            report = agent.last_health
            assert report is not None
            assert report.verdict is Verdict.HEALTHY

    asyncio.run(scenario())


def test_malformed_golden_set_fails_the_update_and_keeps_the_model_served(
    home: Home, tmp_path: Path, demo_models: dict[str, DemoModel], v1: Release, v2: Release
) -> None:
    stock(tmp_path, demo_models["digits-v1"], demo_models["digits-v2"])
    checked = v2.model_copy(update={"golden": stock_golden(tmp_path, b"\xc1 not a golden set")})
    agent = make(home, tmp_path)

    async def scenario() -> None:
        async with running(agent) as task:
            await deliver(agent, topics.trust(), home.trust())
            await deliver_manifest(agent, signed(home, 1, v1))
            await serving(agent, task, v1)
            await deliver_manifest(agent, signed(home, 2, v1, checked))
            await until(lambda: verdict_on(agent, "r1"), "a verdict on the candidate", task)
            report = agent.last_health
            assert report is not None
            assert report.verdict is Verdict.UNHEALTHY
            assert report.reasons == (Reason.MALFORMED.value,)
            assert agent.active_release == v1
            assert agent.stage is Stage.DEGRADED
            assert agent.failed_releases == (FailedRelease(v2.artifact.sha256, rollout_id="r1"),)
            served = agent.inferences_total
            await until(lambda: agent.inferences_total > served + 10, "inference on v1", task)
            await until(
                lambda: any(e.kind is EventKind.ARTIFACT_REJECTED for e in events(tmp_path)),
                "the artifact_rejected event",
                task,
            )

    asyncio.run(scenario())
    (rejected,) = [e for e in events(tmp_path) if e.kind is EventKind.ARTIFACT_REJECTED]
    assert rejected.reason == Reason.MALFORMED.value
    assert rejected.detail.startswith("golden set does not decode: malformed: not msgpack")
    assert rejected.release == checked.release_id


# -- 4, 5: failing support parts never stop inference; the newest state is on disk -------


def test_state_file_unwritable_does_not_stop_updates_or_inference(
    home: Home, tmp_path: Path, demo_models: dict[str, DemoModel], v1: Release, v2: Release
) -> None:
    stock(tmp_path, demo_models["digits-v1"], demo_models["digits-v2"])
    agent = make(home, tmp_path)
    state_file = tmp_path / "state.json"

    async def scenario() -> None:
        async with running(agent) as task:
            await deliver(agent, topics.trust(), home.trust())
            await deliver_manifest(agent, signed(home, 1, v1))
            await serving(agent, task, v1)
            # The disk fails: the state file cannot be replaced any more. (A write in
            # flight may put the file back between the unlink and the mkdir: again.)
            while not state_file.is_dir():
                state_file.unlink(missing_ok=True)
                with contextlib.suppress(FileExistsError):
                    state_file.mkdir()
            (state_file / "blocker").write_bytes(b"")
            await deliver_manifest(agent, signed(home, 2, v1, v2))
            assert agent.applied_seq == 2
            await until(lambda: verdict_on(agent, "r1"), "a verdict on the candidate", task)
            await serving(agent, task, v2)
            served = agent.inferences_total
            await until(lambda: agent.inferences_total > served + 10, "inference", task)
            assert "state" in agent.storage_trouble
            # The disk is back: the storage task writes the newest state by itself.
            shutil.rmtree(state_file)
            await until(lambda: not agent.storage_trouble, "the state written again", task)

    asyncio.run(scenario())
    stored = AgentStore(state_file).load()
    assert stored.applied_seq == 2
    assert stored.active == v2
    assert stored.last_health == agent.last_health
    assert stored.known_good == (v1.artifact.sha256, v2.artifact.sha256)


def test_outbox_locked_by_another_writer_holds_the_window_and_delivers_it_merged(
    tmp_path: Path,
) -> None:
    """Another writer holds the outbox's lock past the busy timeout: the window is held,
    not lost and not taken for storage trouble (the lock is contention), and it goes out
    merged into the next one. (Agents wait SQLite's 5 s; here 50 ms.)"""
    fed: list[EngineEvent] = []
    clock = iter(float(t) for t in range(100)).__next__
    journal = Journal(
        Outbox(tmp_path / "outbox.sqlite", busy_timeout_s=0.05),
        device_id=DEVICE,
        feed=fed.append,
        clock=clock,
        limits=Limits(),
    )
    result = InferenceResult(latency_ms=1.0, confidence=0.9, label=3)

    async def scenario() -> None:
        await asyncio.to_thread(len, journal.outbox)  # the file exists from here on
        other = sqlite3.connect(tmp_path / "outbox.sqlite", isolation_level=None)
        try:
            for _ in range(30):
                journal.record(tally("v1", result))
            other.execute("BEGIN EXCLUSIVE")
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                await journal.commit_window()
        finally:
            other.execute("ROLLBACK")
            other.close()
        for _ in range(12):
            journal.record(tally("v1", None))
        await journal.commit_window()
        await asyncio.to_thread(journal.outbox.close)

    asyncio.run(scenario())
    assert not [e for e in fed if isinstance(e, StorageFailed)], "contention is no trouble"
    db = sqlite3.connect(f"file:{tmp_path / 'outbox.sqlite'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT payload FROM outbox WHERE kind = 'telemetry'").fetchall()
    finally:
        db.close()
    (summary,) = [decode(bytes(r[0]), TelemetrySummary) for r in rows]
    assert (summary.count, summary.errors) == (42, 12)


def test_concurrent_saves_leave_the_newest_state_on_disk(tmp_path: Path) -> None:
    keeper = StateKeeper(
        tmp_path / "state.json", device_id=DEVICE, feed=lambda _: None, clock=time.time
    )

    async def scenario() -> None:
        await asyncio.to_thread(keeper.open)
        try:
            for round_ in range(10):
                # known_good must survive a crash: every change of it is written at once.
                await asyncio.gather(
                    *(keeper.save(known_good=(f"{round_ * 100 + i:064x}",)) for i in range(20))
                )
                stored = await asyncio.to_thread(AgentStore(tmp_path / "state.json").load)
                assert stored == keeper.state
                assert stored.known_good == (f"{round_ * 100 + 19:064x}",)
        finally:
            await asyncio.to_thread(keeper.close)

    asyncio.run(scenario())


# -- 6: the input source ------------------------------------------------------------------


def test_source_is_only_called_from_the_event_loop(
    home: Home, tmp_path: Path, demo_models: dict[str, DemoModel], v1: Release
) -> None:
    stock(tmp_path, demo_models["digits-v1"])
    camera = Camera()
    agent = make(home, tmp_path, camera)

    async def scenario() -> None:
        async with running(agent) as task:
            await deliver(agent, topics.trust(), home.trust())
            await deliver_manifest(agent, signed(home, 1, v1))
            await serving(agent, task, v1)
            await until(lambda: agent.inferences_total > 20, "inference", task)

    asyncio.run(scenario())
    assert camera.wrong_thread == 0
    assert agent.inference_errors == 0


def test_a_failing_source_counts_as_inference_errors(
    home: Home, tmp_path: Path, demo_models: dict[str, DemoModel], v1: Release
) -> None:
    stock(tmp_path, demo_models["digits-v1"])
    lenient = with_budget(v1, max_error_rate=0.5)
    agent = make(home, tmp_path, Camera(fail_every=4))

    async def scenario() -> None:
        async with running(agent) as task:
            await deliver(agent, topics.trust(), home.trust())
            await deliver_manifest(agent, signed(home, 1, lenient))
            await serving(agent, task, lenient)
            await until(lambda: agent.inference_errors >= 10, "failed frames counted", task)
            assert agent.inferences_total >= 3 * agent.inference_errors

    asyncio.run(scenario())


# -- 7: rejected payloads, redelivered ----------------------------------------------------


def _trust_v2(home: Home, manifest_key: KeyPair) -> bytes:
    """TrustDoc v2, root-signed, moving the manifest role to ``manifest_key``."""
    root = home.key(Role.ROOT)
    current = {role: home.key(role) for role in Role}
    current[Role.MANIFEST] = manifest_key
    now = time.time()
    doc = TrustDoc(
        version=2,
        issued_at=now,
        expires_at=now + 86400,
        keys={pair.id: public_raw(pair.public) for pair in current.values()},
        roles={role: RoleKeys(keys=(pair.id,)) for role, pair in current.items()},
    )
    return seal(TRUST_KIND, encode(doc), [root])


def test_rejected_manifest_redelivered_stays_quiet_and_is_reverified_on_new_trust(
    home: Home, tmp_path: Path, demo_models: dict[str, DemoModel], v1: Release
) -> None:
    stock(tmp_path, demo_models["digits-v1"])
    agent = make(home, tmp_path)
    new_key = KeyPair.generate()
    by_new_key = signed(home, 1, v1, key=new_key)
    bad_trust = b"\xc1 not a trust document"

    def rejections(kind: EventKind) -> list[Event]:
        return [e for e in events(tmp_path) if e.kind is kind]

    async def scenario() -> None:
        async with running(agent) as task:
            await deliver(agent, topics.trust(), home.trust())
            for _ in range(3):  # a flapping link: the retained messages again and again
                await deliver_manifest(agent, by_new_key)
                await deliver(agent, topics.trust(), bad_trust)
            assert [e.reason for e in rejections(EventKind.MANIFEST_REJECTED)] == [
                Reason.UNKNOWN_KEY.value
            ]
            assert len(rejections(EventKind.TRUST_REJECTED)) == 1
            # The keys rotate: the manifest rejected earlier verifies now.
            await deliver(agent, topics.trust(), _trust_v2(home, new_key))
            assert agent.applied_seq == 1
            await serving(agent, task, v1)

    asyncio.run(scenario())


# -- 8: fetching with the chunk collector -------------------------------------------------


def test_fetch_takes_chunks_in_any_order_and_resumes_from_disk(
    home: Home, tmp_path: Path, demo_models: dict[str, DemoModel], v1: Release
) -> None:
    data = demo_models["digits-v1"].path.read_bytes()
    meta, chunks = split_artifact(data, name="digits-v1", chunk_size=1024)
    assert len(chunks) >= 4

    async def scenario() -> Path:
        async with fetching(tmp_path) as fetcher:
            earlier = [(i, chunks[i]) for i in range(0, len(chunks), 2)]
            fetcher.store.keep_chunks(meta.sha256, earlier)  # a fetch interrupted earlier
            queue: asyncio.Queue[Message] = asyncio.Queue()
            sha = meta.sha256
            order = [i for i in reversed(range(len(chunks))) if i % 2][:2]
            for index in order:  # chunks before the meta, one twice
                queue.put_nowait(retained(topics.artifact_chunk(sha, index), chunks[index]))
            queue.put_nowait(retained(topics.artifact_meta(sha), encode(meta)))
            for index in range(len(chunks)):
                queue.put_nowait(retained(topics.artifact_chunk(sha, index), chunks[index]))
            return await asyncio.wait_for(
                fetcher.collect(v1.artifact, ArtifactKind.MODEL, queue), GUARD_S
            )

    path = asyncio.run(scenario())
    assert path.read_bytes() == data


# -- 9, 10: outbox bounds, and no disk work on construction -------------------------------


def test_coarsening_is_announced_by_an_event(
    home: Home, tmp_path: Path, demo_models: dict[str, DemoModel], v1: Release
) -> None:
    stock(tmp_path, demo_models["digits-v1"])
    agent = make(home, tmp_path, outbox_max_items=4, telemetry_window_s=0.05)

    async def scenario() -> None:
        async with running(agent) as task:
            await deliver(agent, topics.trust(), home.trust())
            await deliver_manifest(agent, signed(home, 1, v1))
            await serving(agent, task, v1)
            await until(
                lambda: any(e.kind is EventKind.TELEMETRY_COARSENED for e in events(tmp_path)),
                "a telemetry_coarsened event",
                task,
            )

    asyncio.run(scenario())
    (event, *_) = [e for e in events(tmp_path) if e.kind is EventKind.TELEMETRY_COARSENED]
    assert "merges of queued telemetry windows" in event.detail


def test_constructing_an_agent_touches_no_disk(home: Home, tmp_path: Path) -> None:
    make(home, tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_events_dropped_for_the_cap_are_counted_in_the_events_kept(
    home: Home, tmp_path: Path, v1: Release
) -> None:
    """Offline for long, rejections pile up beyond the event cap: the oldest go, and the
    events kept say how many went before them, so none is lost without a count."""
    agent = make(home, tmp_path, outbox_max_events=4)

    async def scenario() -> None:
        async with running(agent):
            await deliver(agent, topics.trust(), home.trust())
            for seq in range(1, 11):  # ten distinct manifests signed by the wrong key
                await deliver_manifest(agent, signed(home, seq, v1, key=home.key(Role.OPERATOR)))

    asyncio.run(scenario())
    db = sqlite3.connect(f"file:{tmp_path / 'outbox.sqlite'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT payload FROM outbox WHERE kind = 'event'").fetchall()
    finally:
        db.close()
    events = [decode(bytes(r[0]), Event) for r in rows]
    rejected = [e for e in events if e.kind is EventKind.MANIFEST_REJECTED]
    assert len(events) == 4
    assert len(rejected) + sum(e.dropped_before for e in events) == 10


# -- the lost-event count, the flush's unacked rows, the link's backoff -------------------


def test_concurrent_events_on_a_failing_outbox_never_count_below_zero(
    tmp_path: Path,
) -> None:
    """Events the outbox could not store are counted in the next one stored, even when
    several are emitted at once while the outbox fails and recovers: none is counted
    twice, none is forgotten, and the count never goes negative (an Event refuses that)."""
    fed: list[EngineEvent] = []
    journal = parts.journal(tmp_path, fed)
    emitted = 0

    async def scenario() -> None:
        nonlocal emitted
        await asyncio.to_thread(len, journal.outbox)  # the file exists from here on

        def writable(yes: bool) -> None:
            # A real SQLite failure that outlives the outbox reopening its connection
            # (which it does after a failure): a trigger refusing every insert.
            other = sqlite3.connect(tmp_path / "outbox.sqlite", isolation_level=None)
            try:
                if yes:
                    other.execute("DROP TRIGGER IF EXISTS refuse")
                else:
                    other.execute(
                        "CREATE TRIGGER IF NOT EXISTS refuse BEFORE INSERT ON outbox "
                        "BEGIN SELECT RAISE(FAIL, 'the disk said no'); END"
                    )
            finally:
                other.close()

        async def burst(n: int) -> None:
            nonlocal emitted
            emitted += n
            await asyncio.gather(
                *(
                    journal.emit(EventKind.MANIFEST_REJECTED, "bad_signature", f"e{i}", None)
                    for i in range(n)
                )
            )

        calm = asyncio.Event()

        async def flapping() -> None:
            # Ends by itself rather than by cancellation: a cancelled to_thread call
            # would still run its thread and could put the trigger back afterwards.
            while not calm.is_set():
                for yes in (False, True):
                    await asyncio.to_thread(writable, yes)
                    await asyncio.sleep(0.001)

        try:
            writable(False)
            await burst(3)
            assert journal.events_lost == 3
            writable(True)
            await burst(4)
            assert journal.events_lost == 0
            flap = asyncio.create_task(flapping())
            for _ in range(5):
                await burst(8)
                assert journal.events_lost >= 0
            calm.set()
            await flap
            writable(True)
            await burst(1)
            assert journal.events_lost == 0
        finally:
            await asyncio.to_thread(journal.outbox.close)

    asyncio.run(scenario())
    # The outbox failed and recovered, and said so to the engine (which tells each
    # recovery in an event of its own: tested with the engine).
    told = [type(e) for e in fed]
    assert StorageFailed in told
    assert told[-1] is StorageOk
    stored = events(tmp_path)
    assert all(e.dropped_before >= 0 for e in stored)
    assert len(stored) + sum(e.dropped_before for e in stored) == emitted
