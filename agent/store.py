"""What an agent remembers across restarts, in a crash-safe document store.

The trust and manifest are kept as the exact signed bytes that were verified, so a
restarted agent re-verifies them instead of trusting a re-serialization.

A state file that does not parse (empty, truncated, garbage: a disk that lied about a
write, a hand edit) is not fatal: :meth:`AgentStore.load` says so with a
:class:`DamagedFileError` naming the file, the agent moves it aside
(:func:`set_aside`) and rebuilds from the retained topics and its model store.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from schemas import HealthReport, Release
from schemas.errors import bound_text
from storage import atomic_write

__all__ = [
    "MAX_WHY_CHARS",
    "AgentStore",
    "DamagedFileError",
    "PersistedState",
    "SoakRecord",
    "set_aside",
]

MAX_WHY_CHARS = 200
"""What was wrong with a damaged file, as far as an event tells it."""

_TABLE = "_default"
_DOC_ID = 1


class DamagedFileError(Exception):
    """A file of the device's store is unreadable as what it should be.

    Attributes:
        path: the damaged file.
        why: what was wrong with it (bounded, for an event).
    """

    def __init__(self, path: Path, why: str) -> None:
        why = bound_text(why, MAX_WHY_CHARS)
        super().__init__(f"{path} is damaged: {why}")
        self.path = path
        self.why = why


def set_aside(path: Path) -> Path:
    """Rename a damaged ``path`` to ``<name>.damaged-<UTC time>`` beside it, kept for a
    look; returns the new name. Companion files (``<name>-wal``, ``<name>-shm``) move
    with it, so SQLite never pairs a fresh database with an old journal.

    Raises:
        OSError: the rename failed (the folder is read-only).
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    path.replace(aside)
    for suffix in ("-wal", "-shm"):
        companion = path.with_name(path.name + suffix)
        if companion.exists():
            companion.replace(aside.with_name(aside.name + suffix))
    return aside


class SoakRecord(BaseModel):
    """The target being soaked: written before its swap, cleared when the soak ends.
    Found at a start, the release took the agent down (the crash-loop guard)."""

    model_config = ConfigDict(frozen=True)

    release: Release
    rollout_id: str | None
    seq: int


class PersistedState(BaseModel):
    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    trust: bytes | None = None
    manifest: bytes | None = None
    applied_seq: int = 0
    active: Release | None = None
    known_good: tuple[str, ...] = ()
    """sha256 of releases that passed a soak here."""
    failed: tuple[str, ...] = ()
    """``<rollout>:<sha256>`` of releases that failed here and are not retried in that
    rollout; ``stable@<release digest>:<sha256>`` for a stable target, retried only once
    a manifest changes the release (earlier agents kept ``seq<N>:<sha256>``)."""
    last_health: HealthReport | None = None
    soaking: SoakRecord | None = None


class AgentStore:
    """Blocking; the agent calls it from a thread. Constructing it touches no disk (the
    data folder may be read-only or missing at start: the first save creates it).

    The file is JSON in the layout TinyDB gave it (``{"_default": {"1": {"state":
    <PersistedState JSON>}}}``), so files written by earlier agents still load; it is
    read and written whole here, and anything else found there is damage.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> PersistedState:
        """The stored state; a fresh one when there is no file yet.

        Raises:
            DamagedFileError: the file is empty, not JSON, or not a stored state.
            OSError: the file cannot be read.
        """
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return PersistedState()
        if not raw:
            # Never written that way: the file is replaced whole, so empty is damage.
            raise DamagedFileError(self.path, "empty file")
        try:
            text = json.loads(raw)[_TABLE][str(_DOC_ID)]["state"]
            if not isinstance(text, str):
                msg = f"state is a {type(text).__name__}, not a JSON text"
                raise TypeError(msg)
            return PersistedState.model_validate_json(text)
        except (ValueError, TypeError, KeyError) as exc:
            # JSONDecodeError, UnicodeDecodeError and ValidationError are ValueErrors;
            # the others come from JSON of another shape.
            raise DamagedFileError(self.path, f"{type(exc).__name__}: {exc}") from exc

    def save(self, state: PersistedState) -> None:
        """Replace the file with ``state`` atomically, without reading it first: a
        damaged file that could not be moved aside is overwritten, not an obstacle. One
        fsync (see :func:`storage.atomic_write`'s ``sync_folder``).

        Raises:
            OSError: the file cannot be written (a full or read-only disk).
        """
        doc = {_TABLE: {str(_DOC_ID): {"state": state.model_dump_json()}}}
        payload = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        atomic_write(self.path, payload, mode=0o600, sync_folder=False)

    def close(self) -> None:
        """Nothing stays open between calls."""
