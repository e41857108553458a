"""The coordinator's own crash-safe store: the source of truth for seq numbers,
stable releases and rollout records, a few documents written rarely (TinyDB behind
atomic file replacement), and beside it the append-only audit log
(:mod:`coordinator.audit`). The broker's retained topics are only a cache of it.
Blocking: the coordinator calls it from a thread."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from tinydb import Query

from coordinator.audit import AUDIT_FILENAME, DEFAULT_MAX_ENTRIES, AuditLog
from coordinator.rollout import RolloutRecord
from schemas import Release, UsageError
from storage import atomic_write, open_docstore

__all__ = ["ClassRecord", "CoordinatorStore", "Refusal", "StoreDamagedError"]

log = logging.getLogger(__name__)


class StoreDamagedError(UsageError):
    """The store file exists but cannot be read whole: the coordinator will not start
    on it (an empty store would re-admit finished rollouts and forget stable releases)."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(
            f"coordinator store {path} is damaged ({why}). Move it aside (e.g. "
            f"`mv {path} {path}.damaged`) and start again: the coordinator then recovers "
            "from the broker's retained topics (trust, manifests, rollout statuses)."
        )
        self.path = path


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


class Refusal(BaseModel):
    """A spec refused before any rollout record could name it (bad signature, another
    rollout's id): kept so that it is reported once, not on every redelivery."""

    model_config = ConfigDict(frozen=True)

    id: str
    digest: str
    """sha256 of the refused spec bytes."""
    reason: str
    at: float


class CoordinatorStore:
    def __init__(self, path: Path, *, max_audit_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        """Open the store, checking every record in it.

        Raises:
            StoreDamagedError: the file is empty, truncated, not JSON, or holds records
                that do not validate.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fresh = not path.exists()
        """No store file at start: nothing decided yet, or the store was lost."""
        self._heartbeat = path.with_name(path.name + ".heartbeat")
        if self.fresh:
            # Written at once: from now on a missing file means a lost store, and an
            # empty one a damaged store.
            atomic_write(path, b"{}", mode=0o600)
        else:
            _check(path)
        self._db = open_docstore(path)
        self._classes = self._db.table("classes")
        self._rollouts = self._db.table("rollouts")
        self._refusals = self._db.table("refusals")
        self._audit = _open_audit(path.with_name(AUDIT_FILENAME), max_audit_entries)
        if not self.fresh:
            try:
                self.classes()
                self.rollouts()
                self.refusals()
            except (KeyError, TypeError, ValidationError) as exc:
                self.close()
                raise StoreDamagedError(
                    path, f"a record does not validate: {type(exc).__name__}"
                ) from None
        # A store written before the audit log had its own file kept it in a table.
        if "audit" in self._db.tables():
            for row in self._db.table("audit").all():
                self._audit.append(dict(row))
            self._db.drop_table("audit")

    def close(self) -> None:
        self._db.close()
        self._audit.close()

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

    def refusals(self) -> dict[str, Refusal]:
        return {row["id"]: Refusal.model_validate_json(row["json"]) for row in self._refusals.all()}

    def put_refusal(self, refusal: Refusal) -> None:
        self._refusals.upsert(
            {"id": refusal.id, "json": refusal.model_dump_json()}, Query().id == refusal.id
        )

    def remove_refusal(self, rollout_id: str) -> None:
        self._refusals.remove(Query().id == rollout_id)

    def audit(self, entry: dict[str, Any]) -> None:
        self._audit.append(entry)

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
        return self._audit.entries()


def _open_audit(path: Path, max_entries: int) -> AuditLog:
    """The audit log at ``path``; a damaged one is moved aside and a new one begun (it
    records decisions, it does not make them: the store is the state)."""
    try:
        return AuditLog(path, max_entries=max_entries)
    except sqlite3.DatabaseError as exc:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = path.with_name(f"{path.name}.damaged-{stamp}")
        path.replace(aside)
        log.warning("coordinator: audit log %s is damaged (%s); moved to %s", path, exc, aside)
        return AuditLog(path, max_entries=max_entries)


def _check(path: Path) -> None:
    """Raises: StoreDamagedError unless ``path`` holds a JSON object of tables."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise StoreDamagedError(path, "not UTF-8 text") from None
    if not text.strip():
        raise StoreDamagedError(path, "empty file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StoreDamagedError(path, f"not JSON: {exc.msg} at char {exc.pos}") from None
    if not isinstance(data, dict) or not all(isinstance(t, dict) for t in data.values()):
        raise StoreDamagedError(path, "not a JSON object of tables")
