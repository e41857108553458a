"""The coordinator's own crash-safe store: the source of truth for seq numbers,
stable releases, rollout records and the audit log. The broker's retained topics are
only a cache of it. Blocking: the coordinator calls it from a thread."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from tinydb import Query

from coordinator.rollout import RolloutRecord
from schemas import Release
from storage import atomic_write, open_docstore

__all__ = ["ClassRecord", "CoordinatorStore"]


class ClassRecord(BaseModel):
    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    name: str
    seq: int = 0
    stable: Release | None = None
    manifest: bytes | None = None
    """The signed manifest last published, re-asserted on every connect."""
    expires_at: float = 0.0
    content: str = ""
    """What the last manifest said (stable and rollout), to tell when to publish anew."""


class CoordinatorStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._heartbeat = path.with_name(path.name + ".heartbeat")
        self._db = open_docstore(path)
        self._classes = self._db.table("classes")
        self._rollouts = self._db.table("rollouts")
        self._audit = self._db.table("audit")

    def close(self) -> None:
        self._db.close()

    def classes(self) -> dict[str, ClassRecord]:
        return {
            row["name"]: ClassRecord.model_validate_json(row["json"]) for row in self._classes.all()
        }

    def put_class(self, record: ClassRecord) -> None:
        self._classes.upsert(
            {"name": record.name, "json": record.model_dump_json()}, Query().name == record.name
        )

    def rollouts(self) -> dict[str, RolloutRecord]:
        return {
            row["id"]: RolloutRecord.model_validate_json(row["json"])
            for row in self._rollouts.all()
        }

    def put_rollout(self, record: RolloutRecord) -> None:
        self._rollouts.upsert(
            {"id": record.id, "json": record.model_dump_json()}, Query().id == record.id
        )

    def audit(self, entry: dict[str, Any]) -> None:
        self._audit.insert(entry)

    def heartbeat(self) -> float | None:
        """When the coordinator last had a live view of the fleet (None: never)."""
        try:
            return float(self._heartbeat.read_text(encoding="ascii"))
        except (FileNotFoundError, ValueError):
            return None

    def put_heartbeat(self, at: float) -> None:
        """A file of its own: a beat every few seconds must not rewrite the whole store."""
        atomic_write(self._heartbeat, repr(at).encode("ascii"), mode=0o600)

    def audit_log(self) -> list[dict[str, Any]]:
        return [dict(row) for row in self._audit.all()]
