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

import contextlib
import hashlib
import shutil
from enum import StrEnum
from pathlib import Path
from typing import Final

from agent.store import DamagedFileError
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
    """Constructing it touches no disk: folders are made by the first write (the data
    folder may be read-only at start; the device serves on and fetches later)."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._partial = root / "partial"

    def path(self, sha256: str, kind: ArtifactKind) -> Path:
        """Where the verified file of artifact ``sha256`` lives (or will)."""
        folder, suffix = _LAYOUT[kind]
        return self._root / folder / f"{sha256}{suffix}"

    def verified(self, ref: ArtifactRef, kind: ArtifactKind) -> Path | None:
        """The whole file for ``ref`` if present and intact, else None.

        Raises:
            DamagedFileError: the file is present but does not hash right (disk
                corruption, tampering); it was deleted so that it is fetched again
                (when the folder is read-only it stays, and is checked again next time).
        """
        path = self.path(ref.sha256, kind)
        if not path.exists():
            return None
        size = path.stat().st_size
        if size == ref.size and _sha256_file(path) == ref.sha256:
            return path
        with contextlib.suppress(OSError):
            path.unlink()
        why = f"{size} B" if size != ref.size else "wrong sha256"
        raise DamagedFileError(path, f"{why}, not the {kind} the manifest names; deleted")

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

    def kept_chunk(self, sha256: str, index: int) -> bytes | None:
        """A kept chunk's bytes, to be checked again before use (the disk, or someone
        with access to it, may have changed them since); None when gone."""
        try:
            return (self._partial / sha256 / str(index)).read_bytes()
        except FileNotFoundError:
            return None

    def drop_chunk(self, sha256: str, index: int) -> None:
        """Forget a kept chunk that failed its check."""
        (self._partial / sha256 / str(index)).unlink(missing_ok=True)

    def probe(self) -> None:
        """Write and remove a small file, to learn whether the store is writable again.

        Raises:
            OSError: it is not (full, or read-only).
        """
        probe = self._root / ".probe"
        atomic_write(probe, bytes(4096))
        probe.unlink()

    def assemble(self, meta: ArtifactMeta, kind: ArtifactKind) -> Path:
        """Join the chunks, check the whole file, and publish it where ``kind`` goes.

        Raises:
            ArtifactError: ARTIFACT_MISMATCH when the whole does not hash right (the
                partial chunks are dropped, so the next fetch starts clean).
            OSError: the store cannot be written (a full or read-only disk).
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
