"""Artifacts cut into chunks, and metas that do not add up."""

from __future__ import annotations

import hashlib
import random

import msgpack
import pytest

from schemas import (
    ArtifactError,
    ArtifactMeta,
    MalformedPayloadError,
    Reason,
    decode,
    encode,
    split_artifact,
)
from schemas.artifact import MAX_CHUNKS, ChunkCollector

CHUNK = 1024


def _model_bytes(size: int) -> bytes:
    return random.Random(size).randbytes(size)


@pytest.mark.parametrize(
    "size", [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 17, 10 * CHUNK - 1]
)
def test_split_artifact_describes_every_chunk_exactly(size: int) -> None:
    data = _model_bytes(size)
    meta, chunks = split_artifact(data, name="model.onnx", chunk_size=CHUNK)

    assert meta.sha256 == hashlib.sha256(data).hexdigest()
    assert meta.size == size
    assert len(chunks) == len(meta.chunks) == -(-size // CHUNK)
    assert b"".join(chunks) == data
    for i, chunk in enumerate(chunks):
        assert hashlib.sha256(chunk).hexdigest() == meta.chunks[i]
        assert len(chunk) == meta.chunk_length(i)
    assert meta.chunk_length(len(chunks) - 1) == size - (len(chunks) - 1) * CHUNK
    assert all(len(c) == CHUNK for c in chunks[:-1])
    assert decode(encode(meta), ArtifactMeta) == meta


def test_split_artifact_uses_the_default_chunk_size() -> None:
    data = _model_bytes(600 * 1024)
    meta, chunks = split_artifact(data, name="model.onnx")
    assert meta.chunk_size == 256 * 1024
    assert [len(c) for c in chunks] == [256 * 1024, 256 * 1024, 88 * 1024]


def test_corrupted_chunk_no_longer_matches_its_hash() -> None:
    meta, chunks = split_artifact(_model_bytes(3 * CHUNK), name="m", chunk_size=CHUNK)
    bad = bytearray(chunks[1])
    bad[0] ^= 0x01
    assert hashlib.sha256(bytes(bad)).hexdigest() != meta.chunks[1]


@pytest.mark.parametrize("delta", [-1, 1])
def test_meta_with_wrong_chunk_count_is_rejected_schema(delta: int) -> None:
    meta, _ = split_artifact(_model_bytes(3 * CHUNK + 5), name="m", chunk_size=CHUNK)
    raw = meta.model_dump()
    chunks = list(meta.chunks)
    raw["chunks"] = chunks[:-1] if delta < 0 else [*chunks, chunks[0]]
    with pytest.raises(ValueError, match="chunk hashes"):
        ArtifactMeta.model_validate(raw)
    forged = msgpack.packb(raw, use_bin_type=True)
    with pytest.raises(MalformedPayloadError) as info:
        decode(forged, ArtifactMeta)
    assert info.value.reason is Reason.SCHEMA


def test_meta_claiming_a_larger_size_than_its_chunks_is_rejected() -> None:
    meta, _ = split_artifact(_model_bytes(2 * CHUNK), name="m", chunk_size=CHUNK)
    with pytest.raises(ValueError, match="chunk hashes"):
        ArtifactMeta.model_validate({**meta.model_dump(), "size": 2 * CHUNK + 1})


@pytest.mark.parametrize("chunk_size", [1023, 1024 * 1024 + 1])
def test_chunk_size_outside_bounds_is_refused(chunk_size: int) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        split_artifact(_model_bytes(4096), name="m", chunk_size=chunk_size)


def test_meta_with_a_chunk_hash_that_is_not_a_sha256_is_refused() -> None:
    # The meta is unsigned; a chunk "hash" that no sha256 can ever equal makes every
    # chunk look corrupt and leaves agents refetching forever. Refuse it at decode.
    meta, _ = split_artifact(_model_bytes(CHUNK), name="m", chunk_size=CHUNK)
    with pytest.raises(ValueError, match="chunks"):
        ArtifactMeta.model_validate({**meta.model_dump(), "chunks": ("../../etc/passwd",)})


def _artifact(size: int = 10_000) -> tuple[ArtifactMeta, list[bytes], bytes]:
    data = bytes((i * 7) % 251 for i in range(size))
    meta, chunks = split_artifact(data, name="m.onnx", chunk_size=1024)
    return meta, chunks, data


def test_collector_accepts_chunks_in_any_order_around_the_meta() -> None:
    meta, chunks, data = _artifact()
    collector = ChunkCollector(meta.sha256, meta.size)
    kept: dict[int, bytes] = {}
    for index in (9, 3, 0):
        assert collector.add_chunk(index, chunks[index]) == []  # held until the meta
    kept.update(collector.add_meta(encode(meta)))
    for index in range(len(chunks)):
        kept.update(collector.add_chunk(index, chunks[index]))
    assert collector.complete
    assert b"".join(kept[i] for i in range(len(chunks))) == data


def test_collector_skips_chunks_it_already_has() -> None:
    meta, chunks, _ = _artifact()
    collector = ChunkCollector(meta.sha256, meta.size, have=range(len(chunks) - 1))
    assert collector.add_meta(encode(meta)) == []
    assert collector.add_chunk(0, chunks[0]) == []
    assert collector.add_chunk(len(chunks) - 1, chunks[-1]) == [(len(chunks) - 1, chunks[-1])]
    assert collector.complete


def test_collector_refuses_a_meta_for_another_artifact() -> None:
    meta, _, _ = _artifact()
    other, _, _ = _artifact(9_000)
    with pytest.raises(ArtifactError) as caught:
        ChunkCollector(meta.sha256, meta.size).add_meta(encode(other))
    assert caught.value.reason is Reason.ARTIFACT_MISMATCH


def test_collector_refuses_a_corrupt_chunk_held_before_the_meta() -> None:
    meta, chunks, _ = _artifact()
    collector = ChunkCollector(meta.sha256, meta.size)
    collector.add_chunk(2, b"\x00" + chunks[2][1:])
    with pytest.raises(ArtifactError) as caught:
        collector.add_meta(encode(meta))
    assert caught.value.reason is Reason.CHUNK_CORRUPT


def test_collector_bounds_what_it_holds_before_the_meta() -> None:
    meta, _, _ = _artifact()
    collector = ChunkCollector(meta.sha256, meta.size)
    held = meta.size // 1024 + 1024  # what fits: the artifact's size and one chunk more
    for index in range(held):
        collector.add_chunk(index, b"\x00" * 1024)
    with pytest.raises(ArtifactError) as caught:
        collector.add_chunk(held, b"\x00" * 1024)
    assert caught.value.reason is Reason.OVERSIZED
    with pytest.raises(ArtifactError):
        collector.add_chunk(MAX_CHUNKS, b"")
