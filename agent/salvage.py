"""What a damaged outbox file still holds: its rows, and where its telemetry stream was.

The outbox moves a damaged file aside and starts a fresh one with what this module reads
back from it. Reading stops at the damage; what was read before it is kept. The stream
goes on where it was (its id and next number, from the file's ``meta`` table or, when that
does not read, from the numbered summaries that do), so the coordinator keeps counting
the device's numbers where it left them and counts none twice.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Final

from schemas import RejectedError, TelemetrySummary, decode

__all__ = ["SalvagedRow", "is_contention", "is_damage", "salvage_outbox"]

SalvagedRow = tuple[str, str, bytes, int, int, int | None, int | None, int]
"""kind, topic, payload, dropped, sent, seq, last_seq, tries."""

_KINDS: Final = ("telemetry", "event")
_FULL: Final = (
    "SELECT kind, topic, payload, dropped, sent, seq, last_seq, tries FROM outbox ORDER BY id"
)
_OLD: Final = "SELECT kind, topic, payload, dropped, 0, NULL, NULL, 0 FROM outbox ORDER BY id"
"""A file of a version before rows were numbered."""


def salvage_outbox(path: Path, limit: int) -> tuple[list[SalvagedRow], dict[str, str]]:
    """The rows of a damaged outbox that still read, oldest first, up to ``limit``, and
    the ``meta`` to carry on its stream (empty: a new stream)."""
    rows: list[SalvagedRow] = []
    meta: dict[str, str] = {}
    try:
        db = sqlite3.connect(path, isolation_level=None)
    except sqlite3.Error:
        return rows, meta
    with contextlib.closing(db):
        for query in (_FULL, _OLD):
            with contextlib.suppress(sqlite3.Error, ValueError, TypeError):
                _read_rows(db.execute(query), rows, limit)
            if rows:
                break
        with contextlib.suppress(sqlite3.Error, ValueError, TypeError):
            meta = {str(k): str(v) for k, v in db.execute("SELECT key, value FROM meta")}
    if "stream" not in meta:
        meta = _stream_of(rows)
    return rows, meta


def _read_rows(cursor: sqlite3.Cursor, rows: list[SalvagedRow], limit: int) -> None:
    while len(rows) < limit:
        row = cursor.fetchone()
        if row is None:
            return
        kind, topic, payload, dropped, sent, seq, last_seq, tries = row
        if kind in _KINDS and isinstance(topic, str) and isinstance(payload, bytes):
            numbered = isinstance(seq, int) and isinstance(last_seq, int)
            rows.append(
                (
                    kind,
                    topic,
                    payload,
                    int(dropped or 0),
                    int(sent or 0),
                    seq if numbered else None,
                    last_seq if numbered else None,
                    int(tries or 0),
                )
            )


def _stream_of(rows: list[SalvagedRow]) -> dict[str, str]:
    """The stream of the newest numbered summary that decodes, and the number after it."""
    for row in reversed(rows):
        if row[5] is None:
            continue
        try:
            summary = decode(row[2], TelemetrySummary)
        except RejectedError:
            continue
        if summary.stream is not None and summary.last_seq is not None:
            last = max(r[6] or 0 for r in rows)
            return {"stream": summary.stream, "next_seq": str(max(last, summary.last_seq) + 1)}
    return {}


# SQLite's primary result codes (sqlite3.h) that the outbox tells apart: damage is
# salvaged, contention waited out.
_BUSY: Final = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED: another writer, wait it out
_DAMAGE: Final = (11, 26)  # SQLITE_CORRUPT, SQLITE_NOTADB


def is_damage(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` says the file is damaged (set it aside and salvage it)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:  # raised by the outbox for a failed quick_check
        return type(exc) is sqlite3.DatabaseError
    return code & 0xFF in _DAMAGE


def is_contention(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` is another writer holding the database (wait it out), rather
    than storage failing."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _BUSY
