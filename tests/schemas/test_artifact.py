"""Artifacts cut into chunks, and metas that do not add up."""

from __future__ import annotations

import hashlib
import random

import msgpack
import pytest

from schemas import ArtifactMeta, MalformedPayloadError, Reason, decode, encode, split_artifact

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
