"""The device's artifact store: verified chunks in, verified whole files out.

Layout under the store's root::

    partial/<sha256>/<index>   chunks already checked against the artifact meta
    models/<sha256>.onnx       model files checked against the signed manifest
    golden/<sha256>.msgpack    golden sets (self-test vectors), checked the same way

A whole file appears under ``models/`` or ``golden/`` only by an atomic rename after
its sha256 and size matched the manifest, so a crash never leaves a partially written
file where the agent would read it. Chunks are kept across restarts, so a fetch
resumes. Every method blocks (hashing, fsync): the agent calls them from a thread.
"""

from __future__ import annotations

import hashlib
import shutil
from enum import StrEnum
from pathlib import Path
from typing import Final

from schemas import ArtifactError, ArtifactMeta, ArtifactRef
from schemas.artifact import check_whole
from storage import atomic_write

__all__ = ["ArtifactKind", "ArtifactStore"]

_HASH_BLOCK: Final = 1 << 20


class ArtifactKind(StrEnum):
    """What an artifact holds, which says where its verified file lives."""

    MODEL = "model"
    GOLDEN = "golden"


_LAYOUT: Final = {
    ArtifactKind.MODEL: ("models", ".onnx"),
    ArtifactKind.GOLDEN: ("golden", ".msgpack"),
}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self._root = root
        self._partial = root / "partial"
        for folder, _ in _LAYOUT.values():
            (root / folder).mkdir(parents=True, exist_ok=True)
        self._partial.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str, kind: ArtifactKind) -> Path:
        """Where the verified file of artifact ``sha256`` lives (or will)."""
        folder, suffix = _LAYOUT[kind]
        return self._root / folder / f"{sha256}{suffix}"

    def verified(self, ref: ArtifactRef, kind: ArtifactKind) -> Path | None:
        """The whole file for ``ref`` if present and intact, else None.

        A file that is present but does not hash right (disk corruption, tampering)
        is removed so it is fetched again.
        """
        path = self.path(ref.sha256, kind)
        if not path.exists():
            return None
        if path.stat().st_size == ref.size and _sha256_file(path) == ref.sha256:
            return path
        path.unlink()
        return None

    def keep_chunks(self, sha256: str, chunks: list[tuple[int, bytes]]) -> None:
        """Keep chunks already checked against the meta (by a ``ChunkCollector``)."""
        for index, data in chunks:
            atomic_write(self._partial / sha256 / str(index), data)

    def stored_chunks(self, sha256: str) -> set[int]:
        """Indexes of the chunks of ``sha256`` kept so far (one folder listing)."""
        folder = self._partial / sha256
        if not folder.is_dir():
            return set()
        return {int(p.name) for p in folder.iterdir() if p.name.isdigit()}

    def assemble(self, meta: ArtifactMeta, kind: ArtifactKind) -> Path:
        """Join the chunks, check the whole file, and publish it where ``kind`` goes.

        Raises:
            ArtifactError: ARTIFACT_MISMATCH when the whole does not hash right (the
                partial chunks are dropped, so the next fetch starts clean).
        """
        folder = self._partial / meta.sha256
        data = b"".join((folder / str(i)).read_bytes() for i in range(len(meta.chunks)))
        try:
            check_whole(meta, data)
        except ArtifactError:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        path = self.path(meta.sha256, kind)
        atomic_write(path, data, mode=0o600)
        shutil.rmtree(folder, ignore_errors=True)
        return path
