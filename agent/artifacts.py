"""The device's artifact store: verified chunks in, verified model files out.

Layout under the store's root::

    partial/<sha256>/<index>   chunks already checked against the artifact meta
    models/<sha256>.onnx       whole files checked against the signed manifest

A model file appears under ``models/`` only by an atomic rename after its sha256
and size matched the manifest, so a crash never leaves a partially written model
where the agent would load it. Chunks are kept across restarts, so a fetch resumes.
Every method blocks (hashing, fsync): the agent calls them from a thread.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Final

from schemas import ArtifactError, ArtifactMeta, ArtifactRef
from schemas.artifact import check_whole
from storage import atomic_write

__all__ = ["ArtifactStore"]

_HASH_BLOCK: Final = 1 << 20


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self._models = root / "models"
        self._partial = root / "partial"
        self._models.mkdir(parents=True, exist_ok=True)
        self._partial.mkdir(parents=True, exist_ok=True)

    def model_path(self, sha256: str) -> Path:
        return self._models / f"{sha256}.onnx"

    def verified(self, ref: ArtifactRef) -> Path | None:
        """The model file for ``ref`` if present and intact, else None.

        A file that is present but does not hash right (disk corruption, tampering)
        is removed so it is fetched again.
        """
        path = self.model_path(ref.sha256)
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

    def assemble(self, meta: ArtifactMeta) -> Path:
        """Join the chunks, check the whole file, and publish it into ``models/``.

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
        path = self.model_path(meta.sha256)
        atomic_write(path, data, mode=0o600)
        shutil.rmtree(folder, ignore_errors=True)
        return path
