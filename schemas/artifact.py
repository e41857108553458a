"""Model artifacts on the wire: a retained meta message and retained raw chunks.

The meta is not signed: it only helps fetching. What makes an artifact trusted is
the signed manifest naming its sha256 and size; each chunk is checked against the
meta as it arrives (so a corrupt chunk is refetched, not carried along) and the
whole file against the manifest before it may be loaded.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Final

from pydantic import Field, model_validator

from schemas.codec import WireModel
from schemas.errors import ArtifactError, Reason

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "MAX_CHUNK_BYTES",
    "ArtifactMeta",
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
