"""The agent's durable store-and-forward queue (SQLite in WAL mode).

Telemetry summaries and events are appended here first and deleted only after the
broker acknowledged them (PUBACK with a success reason code), so a device that is
offline for hours, or restarted, loses nothing.

When the queue reaches its cap, the oldest telemetry summaries are merged pairwise
into coarser ones (see :func:`schemas.telemetry.merge_summaries`): time resolution
drops, counts are conserved. Events have a cap of their own: beyond it the oldest
events are dropped, and the next event appended is told how many (each row carries
the count of the drops it reports, so a dropped reporter's count is passed on too).

A row handed to the MQTT client and not acknowledged (a PUBACK that timed out) is marked
``sent``: the client may still deliver its original bytes after a reconnect, so it is
never merged nor dropped, only sent again as it is. Merging a queued window into it
would get the merged row dropped as a duplicate (it keeps the first row's summary_id).
Storage may fail under it. The file is opened by the first call, and again by the
first call after a storage error (SQLite keeps a connection opened on a read-only
folder read-only for good). A file that is empty or damaged (SQLITE_CORRUPT,
SQLITE_NOTADB, a failed ``quick_check``) is moved aside to ``outbox.sqlite.damaged-<UTC>``
and replaced by a fresh one holding whatever rows of it still read; :meth:`Outbox.take_damage`
says so, for the agent to report. Methods block; the agent calls them from a thread.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.store import MAX_WHY_CHARS, set_aside
from schemas import TelemetrySummary, decode, encode, merge_summaries
from schemas.errors import bound_text

__all__ = ["EVENT", "TELEMETRY", "Outbox", "OutboxItem", "is_contention"]

TELEMETRY: Final = "telemetry"
EVENT: Final = "event"
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    dropped INTEGER NOT NULL DEFAULT 0,
    sent INTEGER NOT NULL DEFAULT 0
)
"""


@dataclass(frozen=True, kw_only=True)
class OutboxItem:
    id: int
    kind: str
    topic: str
    payload: bytes


class Outbox:
    """A bounded, durable FIFO of messages waiting for their PUBACK."""

    def __init__(
        self,
        path: Path,
        *,
        max_items: int = 5000,
        max_events: int = 1000,
        busy_timeout_s: float = 5.0,
    ) -> None:
        """``busy_timeout_s``: how long a call waits for another writer holding the
        file's lock before it fails with "database is locked" (SQLite's own default)."""
        if max_items < 4:
            msg = "max_items must be at least 4"
            raise ValueError(msg)
        if max_events < 1:
            msg = "max_events must be at least 1"
            raise ValueError(msg)
        self._path = path
        self._max_items = max_items
        self._max_events = max_events
        self._busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        """Opened by the first call, and again by the first call after a storage error:
        a connection SQLite opened read-only (a read-only folder) stays read-only, so a
        failed connection is dropped rather than kept."""
        self._damage: list[str] = []
        self._file = 0
        """Bumped whenever a damaged file is replaced: row ids start over."""
        self._leased_from = 0
        self.coarsened = 0
        """How many merges the cap has forced since this outbox was opened."""
        self._leased_upto = 0
        # Rows up to this id were handed out by peek() and may be on the wire. Until
        # settle() marks what of that batch was not acked, coarsening leaves them alone:
        # merging a queued window into one of them would have its PUBACK delete the
        # window unsent.

    # -- the connection, its failures and damage ----------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def _db(self) -> sqlite3.Connection:
        """The open connection (opening it first); call with the lock held.

        Raises:
            sqlite3.Error, OSError: the file cannot be opened, or is damaged beyond repair.
        """
        if self._conn is None:
            self._conn = self._open()
        return self._conn

    def _open(self) -> sqlite3.Connection:
        path = self._path
        if path.exists() and path.stat().st_size == 0:
            # SQLite would take it for a new database; ours always has its header (WAL
            # mode writes it), so an empty file lost everything it held.
            self._recover("empty file", salvage=False)
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            if not _is_damage(exc):
                raise
            self._recover(str(exc), salvage=True)
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(
            self._path,
            timeout=self._busy_timeout_s,
            check_same_thread=False,
            isolation_level=None,
        )
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: an append that returned survives a power cut, which is the point.
            db.execute("PRAGMA synchronous=FULL")
            problems = [r[0] for r in db.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("; ".join(str(p) for p in problems[:3]))
            db.execute(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(outbox)")}
            if "dropped" not in columns:  # an outbox written before events had a cap
                db.execute("ALTER TABLE outbox ADD COLUMN dropped INTEGER NOT NULL DEFAULT 0")
            if "sent" not in columns:  # an outbox written before unacked rows were marked
                db.execute("ALTER TABLE outbox ADD COLUMN sent INTEGER NOT NULL DEFAULT 0")
        except BaseException:
            db.close()
            raise
        return db

    def _recover(self, why: str, *, salvage: bool) -> None:
        """Move the damaged file aside, start a fresh one with whatever rows of the old
        one still read, and note what happened for :meth:`take_damage`.

        Raises:
            OSError: the file cannot be moved (a read-only folder).
        """
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
        aside = set_aside(self._path)
        self._file += 1
        rows = _salvage(aside, self._max_items + self._max_events) if salvage else []
        fresh = self._connect()
        try:
            fresh.execute("BEGIN IMMEDIATE")
            fresh.executemany(
                "INSERT INTO outbox (kind, topic, payload, dropped) VALUES (?, ?, ?, ?)", rows
            )
            fresh.execute("COMMIT")
        finally:
            fresh.close()
        why = bound_text(why, MAX_WHY_CHARS)
        kept = (
            f"{len(rows)} queued messages recovered, any others lost"
            if salvage
            else "the telemetry windows and events queued in it are lost"
        )
        self._damage.append(f"{self._path.name} damaged ({why}): moved to {aside.name}; {kept}")
        self._leased_upto = 0

    def take_damage(self) -> list[str]:
        """What damaged files were replaced since the last call (one text each)."""
        with self._lock:
            damage, self._damage = self._damage, []
        return damage

    @contextlib.contextmanager
    def _guard(self) -> Iterator[sqlite3.Connection]:
        """The connection, for one operation under the lock. A storage error drops the
        connection so the next call opens it anew; damage found on the way is recovered
        from before the error is raised (the caller's next call finds a fresh file)."""
        with self._lock:
            try:
                yield self._db
            except sqlite3.DatabaseError as exc:
                if _is_damage(exc):
                    try:
                        self._recover(str(exc), salvage=True)
                    except (sqlite3.Error, OSError):
                        self._drop()  # not movable now: tried again on the next call
                elif not is_contention(exc):
                    self._drop()
                raise
            except OSError:
                self._drop()
                raise

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
        self._leased_upto = 0

    def probe(self) -> None:
        """Write to the file once (its header's user version), to learn whether storage
        works again.

        Raises:
            sqlite3.Error, OSError: it does not.
        """
        with self._guard() as db:
            (version,) = db.execute("PRAGMA user_version").fetchone()
            db.execute(f"PRAGMA user_version = {(int(version) + 1) % 1_000_000}")

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __len__(self) -> int:
        with self._guard() as db:
            (count,) = db.execute("SELECT COUNT(*) FROM outbox").fetchone()
            return int(count)

    def append(self, kind: str, topic: str, payload: bytes) -> None:
        """Store one message durably, coarsening old telemetry first if full."""
        self._append(kind, topic, lambda _dropped: payload)

    def append_summary(self, topic: str, summary: TelemetrySummary) -> None:
        self._append(TELEMETRY, topic, lambda _dropped: encode(summary))

    def append_event(self, topic: str, build: Callable[[int], bytes]) -> int:
        """Store one event; beyond the event cap the oldest queued events make room.

        ``build(dropped)`` makes the payload, told how many events were dropped since
        the last event that said so (0 mostly). Returns that number.
        """
        return self._append(EVENT, topic, build)

    def _append(self, kind: str, topic: str, build: Callable[[int], bytes]) -> int:
        with self._guard() as db:
            db.execute("BEGIN IMMEDIATE")  # waits out another writer, or raises
            try:
                dropped = self._make_room_for_event(db) if kind == EVENT else 0
                merges = 0
                (count,) = db.execute("SELECT COUNT(*) FROM outbox").fetchone()
                if count >= self._max_items:
                    merges = self._coarsen(db)
                db.execute(
                    "INSERT INTO outbox (kind, topic, payload, dropped) VALUES (?, ?, ?, ?)",
                    (kind, topic, build(dropped), dropped),
                )
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise
            self.coarsened += merges
            return dropped

    def _make_room_for_event(self, db: sqlite3.Connection) -> int:
        """Drop the oldest events beyond the cap (never rows in flight or sent); how many
        went, counting those that the dropped ones reported."""
        (count,) = db.execute("SELECT COUNT(*) FROM outbox WHERE kind = ?", (EVENT,)).fetchone()
        excess = count - self._max_events + 1
        if excess <= 0:
            return 0
        rows = db.execute(
            "SELECT id, dropped FROM outbox WHERE kind = ? AND sent = 0 AND id > ? "
            "ORDER BY id LIMIT ?",
            (EVENT, self._leased_upto, excess),
        ).fetchall()
        db.executemany("DELETE FROM outbox WHERE id = ?", [(r[0],) for r in rows])
        return sum(1 + int(r[1]) for r in rows)

    def peek(self, limit: int) -> list[OutboxItem]:
        """The oldest ``limit`` messages, oldest first."""
        with self._guard() as db:
            rows = db.execute(
                "SELECT id, kind, topic, payload FROM outbox ORDER BY id LIMIT ?", (limit,)
            ).fetchall()
            self._leased_upto = rows[-1][0] if rows else 0
            self._leased_from = self._file
        return [OutboxItem(id=r[0], kind=r[1], topic=r[2], payload=bytes(r[3])) for r in rows]

    def settle(self, acked: list[int], unacked: list[int]) -> None:
        """Settle the batch peek() handed out: forget the messages the broker
        acknowledged, and mark those handed to the client but not acknowledged as sent
        (the client may still deliver them as they are: they are never merged nor
        dropped from now on, only sent again)."""
        with self._guard() as db:
            if self._leased_from != self._file:
                # The batch came from a file since replaced (damaged): its ids name other
                # rows now. What it recovered is sent again; duplicates are dropped.
                self._leased_upto = 0
                return
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("UPDATE outbox SET sent = 1 WHERE id = ?", [(i,) for i in unacked])
                db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in acked])
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise
            self._leased_upto = 0  # settled: what was not acked is re-peeked

    def _coarsen(self, db: sqlite3.Connection) -> int:
        """Merge the oldest half of the telemetry rows pairwise (inside the caller's
        transaction); returns how many merges."""
        rows = db.execute(
            "SELECT id, topic, payload FROM outbox WHERE kind = ? AND sent = 0 AND id > ? "
            "ORDER BY id LIMIT ?",
            (TELEMETRY, self._leased_upto, max(2, self._max_items // 2)),
        ).fetchall()
        if len(rows) < 2:
            # Only events (or rows in flight or sent) are queued: they may exceed the
            # cap rather than be dropped (events have their own cap).
            return 0
        merges = 0
        for (id_a, topic, pay_a), (id_b, _, pay_b) in zip(rows[0::2], rows[1::2], strict=False):
            merged = merge_summaries(
                decode(bytes(pay_a), TelemetrySummary), decode(bytes(pay_b), TelemetrySummary)
            )
            db.execute(
                "UPDATE outbox SET payload = ?, topic = ? WHERE id = ?",
                (encode(merged), topic, id_a),
            )
            db.execute("DELETE FROM outbox WHERE id = ?", (id_b,))
            merges += 1
        return merges


# SQLite's primary result codes (sqlite3.h) that the outbox tells apart.
_BUSY: Final = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED: another writer, wait it out
_DAMAGE: Final = (11, 26)  # SQLITE_CORRUPT, SQLITE_NOTADB


def _is_damage(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:  # raised by _connect for a failed quick_check
        return type(exc) is sqlite3.DatabaseError
    return code & 0xFF in _DAMAGE


def is_contention(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` is another writer holding the database (wait it out), rather
    than storage failing."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _BUSY


def _rollback(db: sqlite3.Connection) -> None:
    # SQLite may have rolled back already (a full disk does that): nothing to undo.
    with contextlib.suppress(sqlite3.Error):
        db.execute("ROLLBACK")


def _salvage(path: Path, limit: int) -> list[tuple[str, str, bytes, int]]:
    """The rows of a damaged outbox that still read, oldest first, up to ``limit``."""
    rows: list[tuple[str, str, bytes, int]] = []
    try:
        db = sqlite3.connect(path, isolation_level=None)
    except sqlite3.Error:
        return rows
    # Reading stops at the damage; what was read before it is kept.
    with contextlib.closing(db), contextlib.suppress(sqlite3.Error, ValueError, TypeError):
        cursor = db.execute("SELECT kind, topic, payload, dropped FROM outbox ORDER BY id")
        while len(rows) < limit:
            row = cursor.fetchone()
            if row is None:
                break
            kind, topic, payload, dropped = row
            if kind in (TELEMETRY, EVENT) and isinstance(topic, str) and isinstance(payload, bytes):
                rows.append((kind, topic, payload, int(dropped or 0)))
    return rows
