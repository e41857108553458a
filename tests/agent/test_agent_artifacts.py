"""The artifact store: only verified chunks are kept, only a verified whole is published,
fetches resume across restarts, and a model rotting on disk is noticed."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.artifacts import ArtifactKind, ArtifactStore
from agent.store import DamagedFileError
from models import DemoModel, DigitsSplit
from schemas import ArtifactError, ArtifactMeta, ArtifactRef, Reason, encode, split_artifact
from schemas.artifact import ChunkCollector
from tests.agent.goldens import golden_for

CHUNK = 4096
MODEL = ArtifactKind.MODEL


@pytest.fixture
def model_bytes(demo_models: dict[str, DemoModel]) -> bytes:
    return demo_models["digits-v2"].path.read_bytes()


@pytest.fixture
def split(model_bytes: bytes) -> tuple[ArtifactMeta, list[bytes]]:
    meta, chunks = split_artifact(model_bytes, name="digits-v2", chunk_size=CHUNK)
    assert len(chunks) > 3  # the tests below need a multi-chunk artifact
    return meta, chunks


def _ref(meta: ArtifactMeta) -> ArtifactRef:
    return ArtifactRef(sha256=meta.sha256, size=meta.size)


def _keep(store: ArtifactStore, meta: ArtifactMeta, chunks: dict[int, bytes]) -> None:
    """What the agent does with arriving chunks: check them, then keep them."""
    collector = ChunkCollector(meta.sha256, meta.size, have=store.stored_chunks(meta.sha256))
    store.keep_chunks(meta.sha256, collector.add_meta(encode(meta)))
    for index, data in chunks.items():
        store.keep_chunks(meta.sha256, collector.add_chunk(index, data))


def _missing(store: ArtifactStore, meta: ArtifactMeta) -> list[int]:
    stored = store.stored_chunks(meta.sha256)
    return [i for i in range(len(meta.chunks)) if i not in stored]


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def test_chunked_artifact_assembles_to_the_exact_bytes_and_only_then_appears(
    tmp_path: Path, model_bytes: bytes, split: tuple[ArtifactMeta, list[bytes]]
) -> None:
    meta, chunks = split
    store = ArtifactStore(tmp_path)
    assert _missing(store, meta) == list(range(len(chunks)))

    for index in reversed(range(len(chunks))):  # arrival order does not matter
        _keep(store, meta, {index: chunks[index]})
        assert store.verified(_ref(meta), MODEL) is None
        assert not list((tmp_path / "models").glob("*"))
    assert _missing(store, meta) == []

    path = store.assemble(meta, MODEL)
    assert path == store.path(meta.sha256, MODEL)
    assert path.read_bytes() == model_bytes
    assert store.verified(_ref(meta), MODEL) == path
    assert list((tmp_path / "models").iterdir()) == [path]


def test_corrupt_chunk_is_refused_and_not_kept(
    tmp_path: Path, split: tuple[ArtifactMeta, list[bytes]]
) -> None:
    meta, chunks = split
    store = ArtifactStore(tmp_path)
    forgeries = {
        "bit flip": (1, _flip(chunks[1], 100)),
        "truncated": (1, chunks[1][:-1]),
        "another chunk's bytes": (1, chunks[2]),
        "index past the end": (len(chunks), chunks[0]),
        "negative index": (-1, chunks[0]),
    }
    for label, (index, data) in forgeries.items():
        with pytest.raises(ArtifactError) as caught:
            _keep(store, meta, {index: data})
        assert caught.value.reason is Reason.CHUNK_CORRUPT, label
    assert _missing(store, meta) == list(range(len(chunks)))


def test_fetch_resumes_after_restart_with_the_chunks_already_stored(
    tmp_path: Path, model_bytes: bytes, split: tuple[ArtifactMeta, list[bytes]]
) -> None:
    meta, chunks = split
    before = ArtifactStore(tmp_path)
    stored = list(range(0, len(chunks), 2))
    _keep(before, meta, {index: chunks[index] for index in stored})

    after = ArtifactStore(tmp_path)  # the agent restarted
    missing = _missing(after, meta)
    assert missing == [i for i in range(len(chunks)) if i not in stored]
    _keep(after, meta, {index: chunks[index] for index in missing})
    assert after.assemble(meta, MODEL).read_bytes() == model_bytes


def test_chunk_rotting_on_disk_before_assembly_is_caught_and_the_fetch_restarts(
    tmp_path: Path, split: tuple[ArtifactMeta, list[bytes]]
) -> None:
    meta, chunks = split
    store = ArtifactStore(tmp_path)
    _keep(store, meta, dict(enumerate(chunks)))
    rotten = tmp_path / "partial" / meta.sha256 / "2"
    rotten.write_bytes(_flip(rotten.read_bytes(), 7))

    with pytest.raises(ArtifactError) as caught:
        store.assemble(meta, MODEL)
    assert caught.value.reason is Reason.ARTIFACT_MISMATCH
    assert store.verified(_ref(meta), MODEL) is None
    assert _missing(store, meta) == list(range(len(chunks)))


@pytest.mark.parametrize("damage", ["bit flip", "truncation"])
def test_model_file_corrupted_on_disk_is_detected_and_removed(
    tmp_path: Path, split: tuple[ArtifactMeta, list[bytes]], damage: str
) -> None:
    meta, chunks = split
    store = ArtifactStore(tmp_path)
    _keep(store, meta, dict(enumerate(chunks)))
    path = store.assemble(meta, MODEL)
    data = path.read_bytes()
    path.write_bytes(_flip(data, len(data) // 2) if damage == "bit flip" else data[:-10])

    with pytest.raises(DamagedFileError) as caught:
        store.verified(_ref(meta), MODEL)
    assert caught.value.path == path  # named, for the event
    assert not path.exists()
    assert store.verified(_ref(meta), MODEL) is None  # fetched again from now on


def test_golden_set_lands_in_its_own_folder_and_models_keep_their_layout(
    tmp_path: Path,
    demo_models: dict[str, DemoModel],
    digits_split: DigitsSplit,
    split: tuple[ArtifactMeta, list[bytes]],
) -> None:
    payload = encode(golden_for(demo_models["digits-v2"], digits_split))
    golden_meta, golden_chunks = split_artifact(payload, name="digits-v2-golden", chunk_size=CHUNK)
    model_meta, model_chunks = split
    store = ArtifactStore(tmp_path)
    _keep(store, golden_meta, dict(enumerate(golden_chunks)))
    _keep(store, model_meta, dict(enumerate(model_chunks)))

    golden = store.assemble(golden_meta, ArtifactKind.GOLDEN)
    model = store.assemble(model_meta, MODEL)
    assert golden == tmp_path / "golden" / f"{golden_meta.sha256}.msgpack"
    assert golden.read_bytes() == payload
    # Where agents before golden sets kept their models: a restart still finds them.
    assert model == tmp_path / "models" / f"{model_meta.sha256}.onnx"
    assert list((tmp_path / "models").iterdir()) == [model]
    assert store.verified(_ref(golden_meta), ArtifactKind.GOLDEN) == golden
    assert store.verified(_ref(model_meta), MODEL) == model
    # The kind is part of the name: a golden set is never taken for a model.
    assert store.verified(_ref(golden_meta), MODEL) is None
    assert golden.exists()


def test_constructing_the_store_touches_no_disk_and_a_probe_says_whether_it_writes(
    tmp_path: Path,
) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    assert not (tmp_path / "artifacts").exists()  # a read-only data folder is no obstacle
    store.probe()
    assert list((tmp_path / "artifacts").iterdir()) == []
    (tmp_path / "blocked").write_bytes(b"")
    with pytest.raises(OSError):  # noqa: PT011 (any OSError: the disk said no)
        ArtifactStore(tmp_path / "blocked" / "artifacts").probe()


def test_kept_chunks_are_read_back_for_a_check_and_dropped_when_bad(
    tmp_path: Path, split: tuple[ArtifactMeta, list[bytes]]
) -> None:
    meta, chunks = split
    store = ArtifactStore(tmp_path)
    _keep(store, meta, {0: chunks[0]})
    assert store.kept_chunk(meta.sha256, 0) == chunks[0]
    assert store.kept_chunk(meta.sha256, 1) is None
    store.drop_chunk(meta.sha256, 0)
    assert store.stored_chunks(meta.sha256) == set()
