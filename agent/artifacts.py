"""The device's artifact store: verified chunks in, verified whole files out.

Layout under the store's root::

    partial/<sha256>/<index>   chunks already checked against the artifact meta
    models/<sha256>.onnx       model files checked against the signed manifest
    golden/<sha256>.msgpack    golden sets (self-test vectors), checked the same way

A whole file appears under ``models/`` or ``golden/`` only by an atomic rename after
its sha256 and size matched the manifest, so a crash never leaves a partially written
file where the agent would read it. Chunks are kept across restarts, so a fetch
resumes. Every method blocks (hashing, fsync): the agent calls them from a thread.

Housekeeping: a file is hashed once per process. Assembling hashes the chunks as they
stream to disk (one chunk in memory at a time); a file verified or assembled here is
not hashed again while its size, modification time and inode stay the same (a restart
hashes it once more). :meth:`ArtifactStore.prune` keeps the files the device may need
(the active, previous and candidate releases) and deletes the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
from collections.abc import Collection, Iterable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Final

from agent.store import DamagedFileError
from schemas import ArtifactError, ArtifactMeta, ArtifactRef, Release
from schemas.errors import Reason
from storage import atomic_write

__all__ = ["ArtifactKind", "ArtifactStore", "files_of"]

_HASH_BLOCK: Final = 1 << 20


class ArtifactKind(StrEnum):
    """What an artifact holds, which says where its verified file lives."""

    MODEL = "model"
    GOLDEN = "golden"


_LAYOUT: Final = {
    ArtifactKind.MODEL: ("models", ".onnx"),
    ArtifactKind.GOLDEN: ("golden", ".msgpack"),
}


def files_of(releases: Iterable[Release | None]) -> frozenset[str]:
    """The sha256 of every file ``releases`` need: their models and golden sets."""
    needed: set[str] = set()
    for release in releases:
        if release is not None:
            needed.add(release.artifact.sha256)
            if release.golden is not None:
                needed.add(release.golden.sha256)
    return frozenset(needed)


def _identity(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


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
        self._checked: dict[Path, tuple[int, int, int]] = {}
        """Files hashed right in this process, with their identity then."""

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
        try:
            identity = _identity(path)
        except FileNotFoundError:
            return None
        if self._checked.get(path) == identity:
            return path
        size = identity[0]
        if size == ref.size and _sha256_file(path) == ref.sha256:
            self._checked[path] = identity
            return path
        self._checked.pop(path, None)
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
        """Stream the chunks into the file, hashing them on the way, and publish it where
        ``kind`` goes if the whole matches (one chunk in memory at a time).

        Raises:
            ArtifactError: ARTIFACT_MISMATCH when the whole does not hash right (the
                partial chunks are dropped, so the next fetch starts clean).
            OSError: the store cannot be written (a full or read-only disk).
        """
        folder = self._partial / meta.sha256
        path = self.path(meta.sha256, kind)
        try:
            atomic_write(path, _checked_blocks(folder, meta), mode=0o600)
        except ArtifactError:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self._checked[path] = _identity(path)
        shutil.rmtree(folder, ignore_errors=True)
        return path

    def prune(self, keep: Collection[str]) -> list[Path]:
        """Delete every stored file and kept chunk whose sha256 is not in ``keep``; the
        paths deleted. A file that cannot be deleted stays (tried again next time).

        Raises:
            OSError: the store cannot be listed.
        """
        deleted: list[Path] = []
        for folder, suffix in _LAYOUT.values():
            for path in _listing(self._root / folder):
                if path.name.endswith(suffix) and path.name[: -len(suffix)] not in keep:
                    with contextlib.suppress(OSError):
                        path.unlink()
                        self._checked.pop(path, None)
                        deleted.append(path)
        for chunks in _listing(self._partial):
            if chunks.name not in keep:
                shutil.rmtree(chunks, ignore_errors=True)
                deleted.append(chunks)
        return deleted


def _listing(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except FileNotFoundError:
        return []


def _checked_blocks(folder: Path, meta: ArtifactMeta) -> Iterator[bytes]:
    """The kept chunks of ``meta`` in order, the last one only once the whole matched.

    Raises:
        ArtifactError: ARTIFACT_MISMATCH when the size or sha256 of the whole is wrong.
    """
    digest = hashlib.sha256()
    size = 0
    held: bytes | None = None
    for index in range(len(meta.chunks)):
        if held is not None:
            yield held
        held = (folder / str(index)).read_bytes()
        digest.update(held)
        size += len(held)
    if size != meta.size or digest.hexdigest() != meta.sha256:
        raise ArtifactError(
            Reason.ARTIFACT_MISMATCH, f"assembled artifact {meta.sha256[:12]} fails its sha256"
        )
    if held is not None:
        yield held
