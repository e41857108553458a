"""What an agent remembers across restarts, in a crash-safe document store.

The trust and manifest are kept as the exact signed bytes that were verified, so a
restarted agent re-verifies them instead of trusting a re-serialization.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict
from tinydb.table import Document

from schemas import HealthReport, Release
from storage import open_docstore

__all__ = ["AgentStore", "PersistedState"]

_DOC_ID = 1


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
    rollout; ``seq<N>:<sha256>`` for a stable target, retried under a later manifest."""
    last_health: HealthReport | None = None


class AgentStore:
    """Blocking; the agent calls it from a thread."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = open_docstore(path)

    def load(self) -> PersistedState:
        doc = self._db.get(doc_id=_DOC_ID)
        if doc is None:
            return PersistedState()
        return PersistedState.model_validate_json(doc["state"])

    def save(self, state: PersistedState) -> None:
        self._db.upsert(Document({"state": state.model_dump_json()}, doc_id=_DOC_ID))

    def close(self) -> None:
        self._db.close()
