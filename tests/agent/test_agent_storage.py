"""Storage that fails or lies, with real files: a damaged state file or outbox, a kept
chunk changed on disk, corrupt chunks on the wire, and a full or read-only data folder
(a real tmpfs, mounted by the test, when the machine lets it). The device keeps
serving, says what happened, and heals by itself."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from agent import Agent, Outbox
from agent.artifacts import ArtifactKind
from agent.engine import UpdateEngine
from agent.events import Desired, FailedRelease, Memory, StorageFailed, StoragePart
from agent.outbox import TELEMETRY
from agent.persistence import StateKeeper
from agent.runtime import InferenceResult
from agent.store import AgentStore, DamagedFileError, PersistedState
from agent.telemetry import TelemetryWindow
from broker.backoff import Retry
from broker.fetch import FetchFailed
from broker.session import Message
from edgefleet.home import Home
from models import DemoModel
from schemas import (
    Event,
    EventKind,
    Mode,
    Reason,
    Release,
    TelemetrySummary,
    decode,
    encode,
    topics,
)
from schemas.artifact import split_artifact
from schemas.device import MAX_REASON_CHARS
from schemas.telemetry import MAX_LABELS, merge_summaries
from tests.agent import parts
from tests.agent.parts import fetching, tally
from tests.agent.test_agent_service import (
    GUARD_S,
    deliver,
    deliver_manifest,
    events,
    make,
    retained,
    running,
    serving,
    signed,
    stock,
    until,
)
from tests.agent.test_agent_service import home as home  # noqa: PLC0414 (the fixture)
from tests.agent.test_agent_service import v1 as v1  # noqa: PLC0414 (the fixture)
from tests.diskfaults import fill, remount, tmpfs


def _empty(data: bytes) -> bytes:
    return data[:0]


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _garbage(data: bytes) -> bytes:
    return os.urandom(max(len(data), 64))


DAMAGES: dict[str, Callable[[bytes], bytes]] = {
    "empty": _empty,
    "truncated": _truncated,
    "garbage": _garbage,
}


def damage(path: Path, how: str) -> None:
    path.write_bytes(DAMAGES[how](path.read_bytes()))


def telemetry_count(data_dir: Path) -> int:
    db = sqlite3.connect(f"file:{data_dir / 'outbox.sqlite'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT payload FROM outbox WHERE kind = ?", (TELEMETRY,)).fetchall()
    finally:
        db.close()
    return sum(decode(bytes(r[0]), TelemetrySummary).count for r in rows)


async def serve_v1(agent: Agent, task: asyncio.Task[None], home: Home, v1: Release) -> None:
    await deliver(agent, topics.trust(), home.trust())
    await deliver_manifest(agent, signed(home, 3, v1))
    await serving(agent, task, v1)


# -- rule 4: a damaged state file ---------------------------------------------------------


@pytest.mark.parametrize("how", sorted(DAMAGES))
def test_damaged_state_file_is_set_aside_and_the_device_rebuilds_from_retained_topics(
    home: Home, tmp_path: Path, demo_models: dict[str, DemoModel], v1: Release, how: str
) -> None:
    stock(tmp_path, demo_models["digits-v1"])

    async def first() -> None:
        agent = make(home, tmp_path)
        async with running(agent) as task:
            await serve_v1(agent, task, home, v1)

    asyncio.run(first())
    state_file = tmp_path / "state.json"
    damage(state_file, how)
    with pytest.raises(DamagedFileError) as caught:
        AgentStore(state_file).load()
    assert caught.value.path == state_file
    agent = make(home, tmp_path)

    async def second() -> None:
        async with running(agent) as task:

            def told() -> list[Event]:
                return [e for e in events(tmp_path) if e.kind is EventKind.STORAGE_DAMAGED]

            await until(told, "a storage_damaged event", task)
            (event,) = told()
            assert str(state_file) in event.detail
            assert "applied manifest seq" in event.detail
            served = agent.inferences_total
            # The retained trust and manifest come again on (re)connect: the device is back.
            await serve_v1(agent, task, home, v1)
            await until(lambda: agent.inferences_total > served + 10, "inference", task)
            assert agent.applied_seq == 3

    asyncio.run(second())
    (aside,) = tmp_path.glob("state.json.damaged-*")
    assert aside.is_file()
    stored = AgentStore(state_file).load()  # a good file again
    assert stored.applied_seq == 3
    assert stored.active == v1


# -- rule 4: a damaged outbox -------------------------------------------------------------


def _filled_outbox(path: Path, rows: int) -> None:
    box = Outbox(path)
    for i in range(rows):
        box.append("event", f"fleet/v1/devices/x/events/{i}", os.urandom(300))
    box.close()  # the last connection checkpoints: everything is in the main file


@pytest.mark.parametrize("how", [*sorted(DAMAGES), "torn tail"])
def test_damaged_outbox_is_set_aside_and_says_what_it_recovered(tmp_path: Path, how: str) -> None:
    path = tmp_path / "outbox.sqlite"
    _filled_outbox(path, 300)
    if how == "torn tail":  # the last pages overwritten: the rows before them still read
        data = path.read_bytes()
        path.write_bytes(data[: -3 * 4096] + os.urandom(3 * 4096))
    else:
        damage(path, how)

    box = Outbox(path)
    try:
        kept = len(box)
        (note,) = box.take_damage()
        assert box.take_damage() == []
        box.append("event", "t", b"x")  # a working outbox again
    finally:
        box.close()
    assert "outbox.sqlite damaged" in note
    (aside,) = tmp_path.glob("outbox.sqlite.damaged-*")
    assert aside.name in note
    if how == "torn tail":
        assert 0 < kept < 300
        assert f"{kept} queued messages recovered" in note
    elif how == "empty":
        assert kept == 0
        assert "are lost" in note
    else:
        assert f"{kept} queued messages recovered, any others lost" in note


def test_outbox_damaged_while_open_is_recovered_on_the_next_call(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    box = Outbox(path)
    try:
        box.append("event", "t", b"before")
        box.close()
        path.write_bytes(os.urandom(8192))  # replaced underneath
        for _ in range(2):  # the first call may fail on the damage it finds
            with contextlib.suppress(sqlite3.DatabaseError):
                box.append("event", "t", b"after")
        assert [i.payload for i in box.peek(10)][-1] == b"after"
        assert box.take_damage()
    finally:
        box.close()


def test_agent_on_a_damaged_outbox_keeps_serving_and_tells(
    home: Home, tmp_path: Path, demo_models: dict[str, DemoModel], v1: Release
) -> None:
    stock(tmp_path, demo_models["digits-v1"])
    agent = make(home, tmp_path)

    async def first() -> None:
        async with running(agent) as task:
            await serve_v1(agent, task, home, v1)
            await until(lambda: telemetry_count(tmp_path) > 0, "telemetry queued", task)

    asyncio.run(first())
    damage(tmp_path / "outbox.sqlite", "garbage")
    again = make(home, tmp_path)

    async def second() -> None:
        async with running(again) as task:
            await serving(again, task, v1)  # from its own store: no broker needed
            await until(
                lambda: any(e.kind is EventKind.STORAGE_DAMAGED for e in events(tmp_path)),
                "a storage_damaged event",
                task,
            )
            served = again.inferences_total
            await until(lambda: telemetry_count(tmp_path) > 0, "telemetry queued again", task)
            assert again.inferences_total > served

    asyncio.run(second())
    (told,) = [e for e in events(tmp_path) if e.kind is EventKind.STORAGE_DAMAGED]
    assert "outbox.sqlite" in told.detail


# -- rule 5: corrupt bytes on the wire or on disk are fetched again, never a verdict ----


def _chunks(model: DemoModel) -> tuple[bytes, list[bytes], bytes]:
    data = model.path.read_bytes()
    meta, chunks = split_artifact(data, name=model.name, chunk_size=1024)
    return data, chunks, encode(meta)


def test_a_corrupt_chunk_ends_the_attempt_for_a_refetch_and_keeps_the_good_ones(
    home: Home, tmp_path: Path, demo_models: dict[str, DemoModel], v1: Release
) -> None:
    data, chunks, meta = _chunks(demo_models["digits-v1"])
    sha = v1.artifact.sha256

    def wire(bad: int | None) -> asyncio.Queue[Message]:
        queue: asyncio.Queue[Message] = asyncio.Queue()
        queue.put_nowait(retained(topics.artifact_chunk(sha, 9999), b"junk far out"))
        for index, chunk in enumerate(chunks):
            payload = b"X" + chunk[1:] if index == bad else chunk
            queue.put_nowait(retained(topics.artifact_chunk(sha, index), payload))
        queue.put_nowait(retained(topics.artifact_meta(sha), meta))
        return queue

    async def scenario() -> Path:
        async with fetching(tmp_path) as fetcher:
            with pytest.raises(FetchFailed) as caught:
                await asyncio.wait_for(
                    fetcher.collect(v1.artifact, ArtifactKind.MODEL, wire(bad=2)), GUARD_S
                )
            assert caught.value.reason is Reason.CHUNK_CORRUPT
            assert "chunks 2 of" in caught.value.detail
            kept = fetcher.store.stored_chunks(sha)
            assert kept == set(range(len(chunks))) - {2}  # the good ones stay
            return await asyncio.wait_for(
                fetcher.collect(v1.artifact, ArtifactKind.MODEL, wire(bad=None)), GUARD_S
            )

    assert asyncio.run(scenario()).read_bytes() == data


def test_a_meta_that_contradicts_the_manifest_is_fetched_again(
    home: Home, tmp_path: Path, demo_models: dict[str, DemoModel], v1: Release
) -> None:
    _, _, other_meta = _chunks(demo_models["digits-v2"])

    async def scenario() -> None:
        queue: asyncio.Queue[Message] = asyncio.Queue()
        queue.put_nowait(retained(topics.artifact_meta(v1.artifact.sha256), other_meta))
        async with fetching(tmp_path) as fetcher:
            with pytest.raises(FetchFailed) as caught:
                await fetcher.collect(v1.artifact, ArtifactKind.MODEL, queue)
            assert caught.value.reason is Reason.ARTIFACT_MISMATCH

    asyncio.run(scenario())


def test_a_kept_chunk_changed_on_disk_is_checked_again_dropped_and_fetched(
    home: Home, tmp_path: Path, demo_models: dict[str, DemoModel], v1: Release
) -> None:
    data, chunks, meta = _chunks(demo_models["digits-v1"])
    sha = v1.artifact.sha256

    async def scenario() -> Path:
        async with fetching(tmp_path) as fetcher:
            fetcher.store.keep_chunks(sha, list(enumerate(chunks)))
            kept = tmp_path / "artifacts" / "partial" / sha / "1"
            kept.write_bytes(b"Y" * len(chunks[1]))  # while the agent was down
            queue: asyncio.Queue[Message] = asyncio.Queue()
            queue.put_nowait(retained(topics.artifact_meta(sha), meta))
            queue.put_nowait(retained(topics.artifact_chunk(sha, 1), chunks[1]))
            return await asyncio.wait_for(
                fetcher.collect(v1.artifact, ArtifactKind.MODEL, queue), GUARD_S
            )

    assert asyncio.run(scenario()).read_bytes() == data
    (told,) = [e for e in events(tmp_path) if e.kind is EventKind.STORAGE_DAMAGED]
    assert "kept chunks 1 fail their sha256" in told.detail


# -- rule 7: a clean stop commits the open window ----------------------------------------


def test_a_requested_stop_commits_the_open_telemetry_window(
    home: Home, tmp_path: Path, demo_models: dict[str, DemoModel], v1: Release
) -> None:
    stock(tmp_path, demo_models["digits-v1"])
    agent = make(home, tmp_path, telemetry_window_s=3600.0)  # no window closes by itself

    async def scenario() -> None:
        task = asyncio.create_task(agent.run())
        await until(agent.ready.is_set, "the state restored", task)
        await serve_v1(agent, task, home, v1)
        await until(lambda: agent.inferences_total > 20, "inference", task)
        agent.request_stop()
        await asyncio.wait_for(task, GUARD_S)  # returns: a stop is no error

    asyncio.run(scenario())
    assert telemetry_count(tmp_path) == agent.inferences_total


def test_texts_built_from_input_are_bounded_where_built(tmp_path: Path) -> None:
    journal = parts.journal(tmp_path)
    engine = UpdateEngine(parts.DEVICE, inference_hz=10.0, retry=Retry())

    async def scenario() -> None:
        try:
            assert await journal.emit(EventKind.ROLLBACK, "r" * 10_000, "d" * 100_000, None)
        finally:
            await asyncio.to_thread(journal.outbox.close)

    asyncio.run(scenario())
    engine.handle(StorageFailed(StoragePart.OUTBOX, "x" * 100_000, 0.0))
    engine.handle(StorageFailed(StoragePart.STATE, "y" * 100_000, 0.0))
    assert engine.mode is Mode.DEGRADED
    reason = engine.degraded_reason
    assert reason is not None
    assert reason.startswith("outbox: ")
    assert len(reason) <= MAX_REASON_CHARS  # a DeviceState would refuse more
    (event,) = events(tmp_path)
    assert len(event.detail) == 2000
    assert event.reason is not None
    assert len(event.reason) == 64


# -- rule 7: a full or read-only data folder ---------------------------------------------


def test_full_disk_degrades_with_the_reason_and_heals_losing_no_inference(
    home: Home, tmp_path: Path, demo_models: dict[str, DemoModel], v1: Release
) -> None:
    with tmpfs(tmp_path / "data", "8m") as data:
        stock(data, demo_models["digits-v1"])
        agent = make(home, data, telemetry_window_s=0.1, state_interval_s=0.2)

        async def scenario() -> None:
            async with running(agent) as task:
                await serve_v1(agent, task, home, v1)
                ballast = await asyncio.to_thread(fill, data)
                await until(lambda: agent.storage_trouble, "storage trouble seen", task)
                state = agent.state()
                assert state.mode is Mode.DEGRADED
                assert state.degraded_reason is not None
                assert "full" in state.degraded_reason or "space" in state.degraded_reason
                served = agent.inferences_total
                await until(lambda: agent.inferences_total > served + 50, "inference", task)
                ballast.unlink()
                await until(lambda: not agent.storage_trouble, "storage healed", task)
                assert agent.state().mode is Mode.SERVING
                assert agent.state().degraded_reason is None
                await until(
                    lambda: any(e.kind is EventKind.STORAGE_RECOVERED for e in events(data)),
                    "a storage_recovered event",
                    task,
                )

        asyncio.run(scenario())
        assert telemetry_count(data) == agent.inferences_total  # nothing lost


def test_read_only_data_folder_at_start_degrades_and_heals_the_outbox(
    home: Home, tmp_path: Path, demo_models: dict[str, DemoModel], v1: Release
) -> None:
    with tmpfs(tmp_path / "data", "32m") as data:
        stock(data, demo_models["digits-v1"])
        first = make(home, data)

        async def once() -> None:
            async with running(first) as task:
                await serve_v1(first, task, home, v1)

        asyncio.run(once())
        remount(data, "ro")
        agent = make(home, data, telemetry_window_s=0.1, state_interval_s=0.2)

        async def scenario() -> None:
            async with running(agent) as task:
                await serving(agent, task, v1)  # from the store it can still read
                await until(lambda: "outbox" in agent.storage_trouble, "the outbox failing", task)
                assert agent.state().mode is Mode.DEGRADED
                await asyncio.to_thread(remount, data, "rw")
                await until(lambda: not agent.storage_trouble, "storage healed", task)
                served = agent.inferences_total
                await until(lambda: telemetry_count(data) >= served, "telemetry stored", task)

        try:
            asyncio.run(scenario())
        finally:
            remount(data, "rw")
        assert telemetry_count(data) == first.inferences_total + agent.inferences_total


def test_a_window_of_countless_labels_stays_within_the_schema_and_counts_them_all() -> None:
    """Labels come from the model's output: a summary of 5,000 distinct ones is still a
    valid message (the rarest counted together), and merging two keeps the bound."""
    window = TelemetryWindow("jetson-000", 0.0)
    for label in range(5000):
        window.record(tally("r", InferenceResult(latency_ms=1.0, confidence=0.5, label=label)))
    first = window.close(1.0)
    assert len(first.labels) == MAX_LABELS
    assert sum(first.labels.values()) == first.count == 5000
    for label in range(5000, 9000):
        window.record(tally("r", InferenceResult(latency_ms=1.0, confidence=0.5, label=label)))
    merged = merge_summaries(first, window.close(2.0))
    assert len(merged.labels) == MAX_LABELS
    assert sum(merged.labels.values()) == merged.count == 9000
    assert decode(encode(merged), TelemetrySummary) == merged


def test_a_damaged_model_in_the_store_is_told_deleted_and_fetched_again(
    home: Home, tmp_path: Path, demo_models: dict[str, DemoModel], v1: Release
) -> None:
    stock(tmp_path, demo_models["digits-v1"])

    async def first() -> None:
        agent = make(home, tmp_path)
        async with running(agent) as task:
            await serve_v1(agent, task, home, v1)

    asyncio.run(first())
    model = tmp_path / "artifacts" / "models" / f"{v1.artifact.sha256}.onnx"
    damage(model, "truncated")
    agent = make(home, tmp_path, fetch_timeout_s=0.3)

    async def second() -> None:
        async with running(agent) as task:
            await until(
                lambda: any(e.kind is EventKind.STORAGE_DAMAGED for e in events(tmp_path)),
                "a storage_damaged event",
                task,
            )
            assert agent.active_release is None  # a damaged model is never loaded
            assert not model.exists()
            stock(tmp_path, demo_models["digits-v1"])  # as a fetch would
            await serving(agent, task, v1)  # the stored manifest's target, retried

    asyncio.run(second())
    (told,) = [e for e in events(tmp_path) if e.kind is EventKind.STORAGE_DAMAGED]
    assert str(model) in told.detail


def test_hostile_messages_on_every_subscribed_topic_end_nothing(
    home: Home, tmp_path: Path, demo_models: dict[str, DemoModel], v1: Release
) -> None:
    """Random, empty, oversized and truncated payloads on trust, the class manifest and
    an artifact's meta and chunks: each is refused or ignored, and the agent serves on."""
    stock(tmp_path, demo_models["digits-v1"])
    agent = make(home, tmp_path)
    sha = v1.artifact.sha256
    good = signed(home, 9, v1)
    payloads = [b"", os.urandom(64), os.urandom(300 * 1024), good[: len(good) // 2], b"\xc1"]
    where = [
        topics.trust(),
        topics.class_manifest("jetson-vision-standard"),
        topics.artifact_meta(sha),
        topics.artifact_chunk(sha, 0),
        topics.artifact_chunk(sha, 3071),
    ]

    async def scenario() -> None:
        async with running(agent) as task:
            await serve_v1(agent, task, home, v1)
            for topic in where:
                for payload in payloads:
                    await deliver(agent, topic, payload)
            served = agent.inferences_total
            await until(lambda: agent.inferences_total > served + 20, "inference", task)
            assert agent.applied_seq == 3
            assert agent.state().last_rejection is not None

    asyncio.run(scenario())
    rejected = [e for e in events(tmp_path) if e.kind is EventKind.MANIFEST_REJECTED]
    assert rejected
    assert all(len(e.detail) <= 2000 for e in events(tmp_path))


def test_junk_chunks_before_the_genuine_ones_do_not_stop_the_fetch(
    home: Home, tmp_path: Path, demo_models: dict[str, DemoModel], v1: Release
) -> None:
    """Junk at an index far out, and at a real index overwritten by the genuine bytes
    before the meta came: the latest publish counts, as in the broker's retained store."""
    data, chunks, meta = _chunks(demo_models["digits-v1"])
    sha = v1.artifact.sha256

    async def scenario() -> Path:
        queue: asyncio.Queue[Message] = asyncio.Queue()
        queue.put_nowait(retained(topics.artifact_chunk(sha, 3072), b"junk"))
        queue.put_nowait(retained(topics.artifact_chunk(sha, 1), b"junk"))
        for index, chunk in enumerate(chunks):
            queue.put_nowait(retained(topics.artifact_chunk(sha, index), chunk))
        queue.put_nowait(retained(topics.artifact_meta(sha), meta))
        async with fetching(tmp_path) as fetcher:
            return await asyncio.wait_for(
                fetcher.collect(v1.artifact, ArtifactKind.MODEL, queue), GUARD_S
            )

    assert asyncio.run(scenario()).read_bytes() == data


def test_a_batch_peeked_from_a_file_since_replaced_is_not_settled_on_the_new_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.sqlite"
    _filled_outbox(path, 300)
    box = Outbox(path)
    try:
        batch = box.peek(10)
        data = path.read_bytes()
        path.write_bytes(data[: -3 * 4096] + os.urandom(3 * 4096))  # torn under it
        box.close()  # (a reconnect: the next call finds the damage)
        recovered = len(box)
        assert box.take_damage()
        box.settle([i.id for i in batch], [])  # the ids of the old file
        assert len(box) == recovered  # nothing of the recovered rows was deleted
    finally:
        box.close()


def test_junk_past_the_artifacts_last_chunk_is_ignored(
    home: Home, tmp_path: Path, demo_models: dict[str, DemoModel], v1: Release
) -> None:
    data = demo_models["digits-v1"].path.read_bytes()
    meta, chunks = split_artifact(data, name="digits-v1", chunk_size=4096)
    sha = v1.artifact.sha256
    past = len(chunks) + 1  # a possible index for 1 KiB chunks, not for these

    async def scenario() -> Path:
        queue: asyncio.Queue[Message] = asyncio.Queue()
        queue.put_nowait(retained(topics.artifact_chunk(sha, past), b"junk before the meta"))
        queue.put_nowait(retained(topics.artifact_meta(sha), encode(meta)))
        queue.put_nowait(retained(topics.artifact_chunk(sha, past), b"junk after the meta"))
        for index, chunk in enumerate(chunks):
            queue.put_nowait(retained(topics.artifact_chunk(sha, index), chunk))
        async with fetching(tmp_path) as fetcher:
            return await asyncio.wait_for(
                fetcher.collect(v1.artifact, ArtifactKind.MODEL, queue), GUARD_S
            )

    assert asyncio.run(scenario()).read_bytes() == data


@pytest.mark.parametrize(
    "text",
    [b"null", b"[]", b'{"a": 1}', b'{"_default": {"1": {"state": 5}}}', b"\xff\xfe", b"{"],
)
def test_a_state_file_of_any_other_shape_is_damage_never_a_silent_fresh_start(
    tmp_path: Path, text: bytes
) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(text)
    with pytest.raises(DamagedFileError) as caught:
        AgentStore(path).load()
    assert caught.value.path == path
    assert AgentStore(tmp_path / "absent.json").load() == PersistedState()


def test_the_soak_record_and_failed_releases_survive_the_state_file(
    tmp_path: Path, v1: Release
) -> None:
    soaking = Desired(v1, "r1", 4)
    memory = Memory(
        active=v1,
        failed=(FailedRelease.of(Desired(v1, None, 2)), FailedRelease.of(soaking)),
        soaking=soaking,
    )
    keeper = StateKeeper(
        tmp_path / "state.json", device_id="d", feed=lambda _: None, clock=lambda: 0.0
    )
    keeper.remember_memory(memory)
    store = AgentStore(tmp_path / "state.json")
    store.save(keeper.state)
    assert StateKeeper.memory_of(store.load()) == memory
    # An earlier agent's stable key (scoped to one manifest seq) is dropped.
    legacy = store.load().model_copy(update={"failed": (f"seq3:{'ab' * 32}",), "soaking": None})
    assert StateKeeper.memory_of(legacy) == Memory(active=v1)
