"""The coordinator's audit log: an append-only SQLite table (WAL) beside its store.

Every decision is one row, appended in its own transaction: an entry costs one small
write, never a rewrite of the store, and the store's TinyDB file stays the few documents
it is meant for. Retention is by count: once the log holds ``max_entries`` plus a tenth,
the oldest tenth goes, so pruning is rare and the file stays bounded whatever a flood of
decisions (or of refused specs) adds. WAL with ``synchronous=NORMAL``: an entry survives a
crash of the process; a power cut may lose the last few, never damage the file.

Blocking: the coordinator calls it from a thread; one lock serialises the connection.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

__all__ = ["AUDIT_FILENAME", "DEFAULT_MAX_ENTRIES", "AuditLog", "read_audit", "read_newest"]

DEFAULT_MAX_ENTRIES = 100_000
AUDIT_FILENAME = "audit.sqlite"
"""The log's name in the coordinator's data folder."""


class AuditLog:
    def __init__(self, path: Path, *, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        """Open (or create) the log at ``path``.

        Raises:
            ValueError: ``max_entries`` is below 1.
            sqlite3.Error: the file is not a database.
        """
        if max_entries < 1:
            msg = f"max_entries must be at least 1, got {max_entries}"
            raise ValueError(msg)
        self.path = path
        self._max = max_entries
        self._slack = max(1, max_entries // 10)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            path.chmod(0o600)  # before its journal exists: SQLite gives that the same mode
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS audit (id INTEGER PRIMARY KEY, entry TEXT NOT NULL)"
            )
            (self._count,) = self._db.execute("SELECT count(*) FROM audit").fetchone()
        except sqlite3.Error:
            self._db.close()
            raise

    def append(self, entry: dict[str, Any]) -> None:
        """Append one entry (a JSON object), pruning the oldest when the log is full."""
        text = json.dumps(entry, sort_keys=True, separators=(",", ":"))
        with self._lock:
            self._db.execute("INSERT INTO audit (entry) VALUES (?)", (text,))
            self._count += 1
            if self._count > self._max + self._slack:
                # Keep the newest max_entries rows.
                self._db.execute(
                    "DELETE FROM audit WHERE id <= (SELECT max(id) FROM audit) - ?",
                    (self._max,),
                )
                self._count = self._max

    def entries(self) -> list[dict[str, Any]]:
        """Every kept entry, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT entry FROM audit ORDER BY id").fetchall()
        return [json.loads(text) for (text,) in rows]

    def __len__(self) -> int:
        with self._lock:
            return int(self._count)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _read_only(path: Path) -> sqlite3.Connection:
    """The log at ``path``, opened read-only (a running coordinator may write it).

    Raises:
        FileNotFoundError: there is no log at ``path``.
    """
    if not path.is_file():
        msg = f"no audit log at {path}"
        raise FileNotFoundError(msg)
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)


def read_audit(path: Path, rollout_id: str | None = None) -> list[dict[str, Any]]:
    """The entries of the log at ``path`` (of one rollout, if given), oldest first, read
    without writing: a running coordinator may hold the log open meanwhile (WAL).

    Raises:
        FileNotFoundError: there is no log at ``path``.
        sqlite3.Error: the file is not such a log.
    """
    db = _read_only(path)
    try:
        rows = db.execute("SELECT entry FROM audit ORDER BY id").fetchall()
    finally:
        db.close()
    entries = [json.loads(text) for (text,) in rows]
    return [e for e in entries if rollout_id is None or e.get("rollout") == rollout_id]


def read_newest(path: Path, limit: int, rollout_id: str | None = None) -> list[dict[str, Any]]:
    """The newest ``limit`` entries of the log at ``path`` (of one rollout, if given),
    oldest first, read without writing: what a dashboard shows, at a cost bounded by
    ``limit`` however long the log.

    Raises:
        FileNotFoundError: there is no log at ``path``.
        sqlite3.Error: the file is not such a log.
    """
    db = _read_only(path)
    try:
        if rollout_id is None:
            rows = db.execute(
                "SELECT entry FROM audit ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
        else:
            rows = db.execute(
                "SELECT entry FROM audit WHERE json_extract(entry, '$.rollout') = ?"
                " ORDER BY id DESC LIMIT ?",
                (rollout_id, limit),
            ).fetchall()
    finally:
        db.close()
    return [json.loads(text) for (text,) in reversed(rows)]
