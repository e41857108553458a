"""Model artifacts on the wire: a retained meta message and retained raw chunks.

The meta is not signed: it only helps fetching. What makes an artifact trusted is
the signed manifest naming its sha256 and size; each chunk is checked against the
meta as it arrives (so a corrupt chunk is refetched, not carried along) and the
whole file against the manifest before it may be loaded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Annotated, Final

from pydantic import Field, model_validator

from schemas.codec import WireModel, decode
from schemas.errors import ArtifactError, Reason

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "MAX_CHUNK_BYTES",
    "ArtifactMeta",
    "ChunkCollector",
    "check_chunk",
    "check_whole",
    "split_artifact",
]

DEFAULT_CHUNK_BYTES: Final = 256 * 1024
MAX_CHUNK_BYTES: Final = 1024 * 1024
SHA256_PATTERN: Final = r"^[0-9a-f]{64}$"
# 66 wire bytes per hex digest: 3072 of them leave room under MAX_MESSAGE_BYTES.
MAX_CHUNKS: Final = 3072


class ArtifactMeta(WireModel):
    sha256: str = Field(pattern=SHA256_PATTERN)
    size: int = Field(ge=1)
    chunk_size: int = Field(ge=1024, le=MAX_CHUNK_BYTES)
    chunks: tuple[Annotated[str, Field(pattern=SHA256_PATTERN)], ...] = Field(
        min_length=1, max_length=MAX_CHUNKS
    )
    name: str = Field(max_length=128)
    media_type: str = "application/onnx"

    @model_validator(mode="after")
    def _chunk_count(self) -> ArtifactMeta:
        expected = -(-self.size // self.chunk_size)
        if len(self.chunks) != expected:
            msg = f"{len(self.chunks)} chunk hashes for {expected} chunks"
            raise ValueError(msg)
        return self

    def chunk_length(self, index: int) -> int:
        if index == len(self.chunks) - 1:
            return self.size - index * self.chunk_size
        return self.chunk_size


def split_artifact(
    data: bytes, *, name: str, chunk_size: int = DEFAULT_CHUNK_BYTES
) -> tuple[ArtifactMeta, list[bytes]]:
    """Cut a model file into chunks and describe them."""
    chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    meta = ArtifactMeta(
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        chunk_size=chunk_size,
        chunks=tuple(hashlib.sha256(c).hexdigest() for c in chunks),
        name=name,
    )
    return meta, chunks


def check_chunk(meta: ArtifactMeta, index: int, data: bytes) -> None:
    """Check one chunk against the meta.

    Raises:
        ArtifactError: CHUNK_CORRUPT when its index, length or sha256 is wrong.
    """
    if not 0 <= index < len(meta.chunks):
        raise ArtifactError(
            Reason.CHUNK_CORRUPT, f"chunk {index} outside 0..{len(meta.chunks) - 1}"
        )
    if (
        len(data) != meta.chunk_length(index)
        or hashlib.sha256(data).hexdigest() != meta.chunks[index]
    ):
        raise ArtifactError(
            Reason.CHUNK_CORRUPT, f"chunk {index} of {meta.sha256[:12]} fails its sha256"
        )


def check_whole(meta: ArtifactMeta, data: bytes) -> None:
    """Check assembled bytes against the meta's digest and size.

    Raises:
        ArtifactError: ARTIFACT_MISMATCH.
    """
    if len(data) != meta.size or hashlib.sha256(data).hexdigest() != meta.sha256:
        raise ArtifactError(
            Reason.ARTIFACT_MISMATCH, f"assembled artifact {meta.sha256[:12]} fails its sha256"
        )


class ChunkCollector:
    """Turns the retained messages of one artifact, in any order, into checked chunks.

    Pure and synchronous (hashing blocks: call it from a thread for big chunks). The
    meta is checked against the reference the signed manifest or spec gives as soon as
    it arrives; chunks that come before it are held, within a bound, and checked when it
    does; every chunk handed back has been checked against the meta.
    """

    def __init__(self, ref_sha256: str, ref_size: int, *, have: Iterable[int] = ()) -> None:
        self._sha256 = ref_sha256
        self._size = ref_size
        self._have = set(have)
        self._early: dict[int, bytes] = {}
        self._early_bytes = 0
        self.meta: ArtifactMeta | None = None

    @property
    def sha256(self) -> str:
        """The sha256 of the artifact being collected, as the reference gives it."""
        return self._sha256

    @property
    def size(self) -> int:
        """The artifact's size in bytes, as the reference gives it."""
        return self._size

    def has(self, index: int) -> bool:
        """Whether chunk ``index`` was accepted already."""
        return index in self._have

    @property
    def complete(self) -> bool:
        return self.meta is not None and len(self._have) == len(self.meta.chunks)

    def add_meta(self, payload: bytes) -> list[tuple[int, bytes]]:
        """Accept the meta; returns the held chunks, now checked.

        Raises:
            MalformedPayloadError: not an ArtifactMeta.
            ArtifactError: ARTIFACT_MISMATCH when it describes another artifact, or
                CHUNK_CORRUPT for a held chunk that fails its hash.
        """
        meta = decode(payload, ArtifactMeta)
        if meta.sha256 != self._sha256 or meta.size != self._size:
            raise ArtifactError(
                Reason.ARTIFACT_MISMATCH,
                f"meta describes {meta.sha256[:12]}/{meta.size} B, expected "
                f"{self._sha256[:12]}/{self._size} B",
            )
        self.meta = meta
        self._have = {i for i in self._have if i < len(meta.chunks)}
        early, self._early = self._early, {}
        self._early_bytes = 0
        accepted = []
        for index, data in sorted(early.items()):
            accepted += self.add_chunk(index, data)
        return accepted

    def add_chunk(self, index: int, data: bytes) -> list[tuple[int, bytes]]:
        """Offer one chunk; returns it when it is new and checked, else nothing.

        Raises:
            ArtifactError: CHUNK_CORRUPT (bad hash, length or index) or OVERSIZED (more
                held before the meta than the artifact can be).
        """
        if index >= MAX_CHUNKS:
            raise ArtifactError(Reason.CHUNK_CORRUPT, f"chunk index {index} out of range")
        if index in self._have:
            return []
        if self.meta is None:
            if index not in self._early:
                self._early_bytes += len(data)
                if self._early_bytes > self._size + MAX_CHUNK_BYTES:
                    raise ArtifactError(Reason.OVERSIZED, "chunks exceed the artifact's size")
                self._early[index] = data
            return []
        check_chunk(self.meta, index, data)
        self._have.add(index)
        return [(index, data)]
