"""A small document store: TinyDB on top of crash-safe whole-file writes.

For what is small and rarely written (an agent's applied state, the coordinator's
seq counters and rollout records): every write replaces the JSON file atomically, so a
crash at any instant leaves the previous or the next state, never a torn file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tinydb import TinyDB
from tinydb.storages import Storage

from storage.atomic import atomic_write

__all__ = ["AtomicJSONStorage", "open_docstore"]


class AtomicJSONStorage(Storage):
    """TinyDB storage writing the whole database with :func:`atomic_write`."""

    def __init__(self, path: str, *, mode: int = 0o600) -> None:
        self._path = Path(path)
        self._mode = mode

    def read(self) -> dict[str, dict[str, Any]] | None:
        try:
            text = self._path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        if not text:
            return None
        data: dict[str, dict[str, Any]] = json.loads(text)
        return data

    def write(self, data: dict[str, dict[str, Any]]) -> None:
        payload = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        atomic_write(self._path, payload, mode=self._mode)

    def close(self) -> None:
        """Nothing stays open between writes."""


def open_docstore(path: Path) -> TinyDB:
    """Open (creating) the document store at ``path``. Blocking: call from a thread."""
    return TinyDB(str(path), storage=AtomicJSONStorage)
