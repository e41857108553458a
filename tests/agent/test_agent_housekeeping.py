"""Housekeeping of the device's store, with real files: the store keeps what the device
may need and deletes the rest, a file is hashed once per process, an artifact is joined
one chunk at a time, and a state write costs one fsync, only for what must survive a
crash."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.artifacts import ArtifactKind, ArtifactStore
from agent.persistence import LAZY, StateKeeper
from agent.store import AgentStore, DamagedFileError
from schemas import ArtifactError, ArtifactMeta, ArtifactRef, HealthReport, Verdict
from schemas.artifact import split_artifact
from storage import atomic_write

DEVICE = "cam-001"


def _artifact(size: int, seed: int) -> tuple[bytes, ArtifactMeta]:
    data = hashlib.sha256(bytes([seed])).digest() * (size // 32 + 1)
    data = data[:size]
    meta, _ = split_artifact(data, name="m", chunk_size=4096)
    return data, meta


def _kept(store: ArtifactStore, data: bytes, meta: ArtifactMeta) -> None:
    _, chunks = split_artifact(data, name="m", chunk_size=meta.chunk_size)
    store.keep_chunks(meta.sha256, list(enumerate(chunks)))


def _ref(meta: ArtifactMeta) -> ArtifactRef:
    return ArtifactRef(sha256=meta.sha256, size=meta.size)


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Counts the real fsyncs made (each still reaches the disk)."""
    count = 0
    real = os.fsync

    def counting(fd: int) -> None:
        nonlocal count
        count += 1
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return lambda: count


def test_the_store_keeps_active_previous_and_candidate_and_deletes_the_rest(
    tmp_path: Path,
) -> None:
    store = ArtifactStore(tmp_path)
    metas = []
    for seed in range(5):
        data, meta = _artifact(10_000, seed)
        _kept(store, data, meta)
        store.assemble(meta, ArtifactKind.MODEL)
        metas.append(meta)
    half, half_meta = _artifact(9_000, 9)
    _kept(store, half, half_meta)  # a fetch left half done for a target since replaced
    keep = {metas[1].sha256, metas[3].sha256, metas[4].sha256}

    deleted = store.prune(keep)

    left = {p.name for p in (tmp_path / "models").iterdir()}
    assert left == {f"{sha}.onnx" for sha in keep}
    assert not (tmp_path / "partial" / half_meta.sha256).exists()
    assert len(deleted) == 3
    assert store.prune(keep) == [], "nothing more to delete"
    assert store.verified(_ref(metas[1]), ArtifactKind.MODEL) is not None


def test_an_assembled_file_is_not_hashed_again_in_this_process(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    data, meta = _artifact(50_000, 1)
    _kept(store, data, meta)
    path = store.assemble(meta, ArtifactKind.MODEL)
    assert path.read_bytes() == data
    # Change a byte in place, keeping size and times: only a new hash would see it.
    stat = path.stat()
    with path.open("r+b") as handle:
        handle.write(b"\xff")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    assert store.verified(_ref(meta), ArtifactKind.MODEL) == path, "taken as hashed"
    # A restarted agent (a new store) hashes it once, and finds the damage.
    with pytest.raises(DamagedFileError):
        ArtifactStore(tmp_path).verified(_ref(meta), ArtifactKind.MODEL)
    assert not path.exists()


def test_a_file_changed_after_its_hash_is_hashed_again(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    data, meta = _artifact(20_000, 2)
    _kept(store, data, meta)
    path = store.assemble(meta, ArtifactKind.MODEL)
    path.write_bytes(data[:-1] + b"\x00")  # a new mtime (or size): hashed again
    os.utime(path, ns=(0, 0))
    with pytest.raises(DamagedFileError):
        store.verified(_ref(meta), ArtifactKind.MODEL)


def test_a_wrong_whole_leaves_no_file_and_drops_the_chunks(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    data, meta = _artifact(30_000, 3)
    _, chunks = split_artifact(data, name="m", chunk_size=meta.chunk_size)
    # Chunks that each matched once but whose last one changed on disk since.
    store.keep_chunks(meta.sha256, list(enumerate(chunks[:-1])))
    store.keep_chunks(meta.sha256, [(len(chunks) - 1, b"\x00" * len(chunks[-1]))])

    with pytest.raises(ArtifactError):
        store.assemble(meta, ArtifactKind.MODEL)

    assert not store.path(meta.sha256, ArtifactKind.MODEL).exists()
    assert not (tmp_path / "partial" / meta.sha256).exists()
    assert [p.name for p in (tmp_path / "models").iterdir()] == [], "no temporary left"


def test_writing_an_existing_file_costs_one_fsync_and_a_new_one_two(
    tmp_path: Path, fsyncs: Callable[[], int]
) -> None:
    path = tmp_path / "f"
    atomic_write(path, b"one", sync_folder=False)
    assert fsyncs() == 2, "a new name: the file and its folder"
    atomic_write(path, b"two", sync_folder=False)
    assert fsyncs() == 3, "an existing name: the file only"
    atomic_write(path, [b"thr", b"ee"])
    assert fsyncs() == 5
    assert path.read_bytes() == b"three"


def _health(at: float) -> HealthReport:
    return HealthReport(
        report_id=f"r{at}",
        device_id=DEVICE,
        rollout_id=None,
        manifest_seq=1,
        release="digits-v1",
        verdict=Verdict.HEALTHY,
        inferences=1,
        errors=0,
        p95_latency_ms=None,
        soak_seconds=0.0,
        at=at,
    )


def test_a_state_write_costs_one_fsync_only_for_what_must_survive_a_crash(
    tmp_path: Path, fsyncs: Callable[[], int]
) -> None:
    path = tmp_path / "state.json"
    assert {"manifest", "applied_seq", "last_health"} == LAZY
    keeper = StateKeeper(path, device_id=DEVICE, feed=lambda _: None, clock=time.time)

    async def scenario() -> None:
        await asyncio.to_thread(keeper.open)
        try:
            await keeper.load()
            await keeper.save(known_good=("a" * 64,))  # creates the file
            created = fsyncs()
            for seq in range(2, 12):
                # Manifests that change nothing else: they come back with the retained
                # manifest after a crash, so they wait in memory.
                await keeper.save(manifest=b"signed %d" % seq, applied_seq=seq)
                await keeper.save(last_health=_health(seq))
            assert fsyncs() == created
            assert AgentStore(path).load().applied_seq == 0
            await keeper.save(failed=("r1:" + "b" * 64,))  # must survive: one fsync
            assert fsyncs() == created + 1
            on_disk = AgentStore(path).load()
            assert on_disk == keeper.state, "a write takes the lazy changes along"
            assert on_disk.applied_seq == 11
            await keeper.save(applied_seq=12)
            await keeper.write(flush=True)  # a stop writes everything
            assert fsyncs() == created + 2
            assert AgentStore(path).load().applied_seq == 12
        finally:
            await asyncio.to_thread(keeper.close)

    asyncio.run(scenario())
