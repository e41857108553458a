"""The coordinator's copy of every artifact a manifest still names.

Retained topics are a cache: if the broker loses them, devices could no longer fetch a
stable or candidate release. The coordinator therefore keeps each admitted candidate's
bytes and the operator's exact meta bytes, re-publishes them on every (re)connect, and
forgets them once no manifest names them. Blocking: the coordinator calls it from a
thread.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

from schemas import ArtifactMeta, RejectedError, decode
from schemas.artifact import check_chunk, check_whole
from storage import atomic_write

__all__ = ["ArtifactStore", "StoredArtifact"]

_NAME = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class StoredArtifact:
    meta: ArtifactMeta
    meta_payload: bytes
    """The meta exactly as the operator published it."""
    data: bytes

    def chunks(self) -> list[bytes]:
        size = self.meta.chunk_size
        return [self.data[i : i + size] for i in range(0, len(self.data), size)]


class ArtifactStore:
    def __init__(self, folder: Path) -> None:
        self._folder = folder

    def _paths(self, sha256: str) -> tuple[Path, Path]:
        if not _NAME.match(sha256):
            msg = f"not a sha256 digest: {sha256!r}"
            raise ValueError(msg)
        return self._folder / f"{sha256}.onnx", self._folder / f"{sha256}.meta"

    def put(self, meta_payload: bytes, data: bytes) -> None:
        """Keep ``data`` (already checked against the meta); the data is written before
        the meta, so a meta on disk implies its data.

        Raises:
            RejectedError: the meta does not decode or does not describe ``data``.
        """
        meta = decode(meta_payload, ArtifactMeta)
        check_whole(meta, data)
        data_path, meta_path = self._paths(meta.sha256)
        atomic_write(data_path, data, mode=0o600)
        atomic_write(meta_path, meta_payload, mode=0o600)

    def get(self, sha256: str) -> StoredArtifact | None:
        """The artifact, checked again against its digest; None when absent or damaged."""
        data_path, meta_path = self._paths(sha256)
        try:
            meta_payload = meta_path.read_bytes()
            data = data_path.read_bytes()
            meta = decode(meta_payload, ArtifactMeta)
            check_whole(meta, data)
        except (FileNotFoundError, RejectedError):
            return None
        if meta.sha256 != sha256:
            return None
        return StoredArtifact(meta=meta, meta_payload=meta_payload, data=data)

    def meta(self, sha256: str) -> tuple[ArtifactMeta, bytes] | None:
        """The kept meta and its exact bytes, without reading the data (the watcher
        compares retained chunks against its per-chunk digests); None when absent."""
        _, meta_path = self._paths(sha256)
        try:
            payload = meta_path.read_bytes()
            meta = decode(payload, ArtifactMeta)
        except (FileNotFoundError, RejectedError):
            return None
        return (meta, payload) if meta.sha256 == sha256 else None

    def chunk(self, meta: ArtifactMeta, index: int) -> bytes | None:
        """Chunk ``index`` of the kept copy, checked against ``meta``; None when the
        copy is gone or damaged."""
        data_path, _ = self._paths(meta.sha256)
        try:
            with data_path.open("rb") as handle:
                handle.seek(index * meta.chunk_size)
                data = handle.read(meta.chunk_length(index))
            check_chunk(meta, index, data)
        except (FileNotFoundError, RejectedError):
            return None
        return data

    def digests(self) -> set[str]:
        if not self._folder.is_dir():
            return set()
        return {p.name.split(".")[0] for p in self._folder.iterdir() if _NAME.match(p.stem)}

    def prune(self, keep: set[str]) -> list[str]:
        """Delete every artifact not in ``keep``; returns the digests deleted."""
        gone = sorted(self.digests() - keep)
        for sha256 in gone:
            data_path, meta_path = self._paths(sha256)
            for path in (meta_path, data_path):  # meta first: a meta implies its data
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        return gone
