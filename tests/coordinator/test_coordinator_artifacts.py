"""The coordinator's own copy of the artifacts its manifests name: kept whole and
checked, given back with the operator's exact meta bytes, pruned when unreferenced."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from coordinator.artifacts import ArtifactStore
from coordinator.store import CoordinatorStore
from schemas import ArtifactError, encode, split_artifact


def _artifact(seed: bytes, size: int = 5000) -> tuple[bytes, bytes]:
    data = (hashlib.sha256(seed).digest() * (size // 32 + 1))[:size]
    meta, _ = split_artifact(data, name="m", chunk_size=1024)
    return encode(meta), data


def test_kept_artifact_comes_back_with_its_meta_bytes_and_chunks(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    meta_payload, data = _artifact(b"a")
    sha = hashlib.sha256(data).hexdigest()
    assert store.get(sha) is None
    store.put(meta_payload, data)
    kept = store.get(sha)
    assert kept is not None
    assert (kept.meta_payload, kept.data) == (meta_payload, data)
    assert b"".join(kept.chunks()) == data
    assert [len(c) for c in kept.chunks()] == [1024] * 4 + [904]
    for path in (tmp_path / "artifacts").iterdir():
        assert path.stat().st_mode & 0o077 == 0


def test_artifact_that_does_not_match_its_meta_is_refused_and_a_damaged_copy_ignored(
    tmp_path: Path,
) -> None:
    store = ArtifactStore(tmp_path)
    meta_payload, data = _artifact(b"a")
    with pytest.raises(ArtifactError):
        store.put(meta_payload, data[:-1] + b"\x00")
    assert store.digests() == set()
    store.put(meta_payload, data)
    sha = hashlib.sha256(data).hexdigest()
    (tmp_path / f"{sha}.onnx").write_bytes(data[:-1] + b"\x00")  # bit rot on disk
    assert store.get(sha) is None


def test_prune_deletes_what_no_manifest_names(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    shas = []
    for seed in (b"a", b"b", b"c"):
        meta_payload, data = _artifact(seed)
        store.put(meta_payload, data)
        shas.append(hashlib.sha256(data).hexdigest())
    assert store.prune({shas[1]}) == sorted([shas[0], shas[2]])
    assert store.digests() == {shas[1]}
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{shas[1]}.meta", f"{shas[1]}.onnx"]


def test_heartbeat_survives_a_restart_without_rewriting_the_store(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.json"
    store = CoordinatorStore(path)
    assert store.heartbeat() is None
    store.put_heartbeat(1_700_000_000.25)
    store.close()
    reopened = CoordinatorStore(path)
    assert reopened.heartbeat() == 1_700_000_000.25
    reopened.close()
    assert not path.exists() or "heartbeat" not in path.read_text()
