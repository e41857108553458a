"""The agent's durable store-and-forward queue (SQLite in WAL mode).

Telemetry summaries and events are appended here first, so a device that is offline for
hours, or restarted, loses nothing. An event leaves once the broker acknowledged it
(PUBACK). A telemetry summary leaves only once the coordinator's ack says it counted it
durably (:meth:`Outbox.acknowledge`): a PUBACK only says the broker holds it in memory.

End to end. Summaries are numbered in the outbox's stream (a random id and the next
number, kept in the file's ``meta`` table): ``seq .. last_seq`` on each row and in its
payload. One the broker took but no ack covers is sent again at its ``due`` time
(``resend_s`` doubling to ``resend_max_s``), and at once after a reconnect or a restart.
Each send carries ``base``, the lowest number still held, so the coordinator learns which
numbers will never come (acknowledged to a store it lost, or lost here).

At the cap, the oldest summaries are merged pairwise (:func:`schemas.merge_summaries`):
time resolution drops, counts are conserved. Only rows never handed to the client merge,
and only with the next number (``seq == last_seq + 1``): a merged row covers exactly
numbers the coordinator cannot have counted. A row handed to the client (PUBACKed or
not) may still be delivered as it is and counted, so it is never merged nor dropped.
Events have a cap of their own: beyond it the oldest unsent events are dropped, and the
next event appended is told how many (passed on if that one is dropped too).

Storage may fail under it. The file is opened by the first call, and again by the first
call after a storage error (SQLite keeps a connection opened on a read-only folder
read-only for good). A file that is empty or damaged (SQLITE_CORRUPT, SQLITE_NOTADB, a
failed ``quick_check``) is moved aside to ``outbox.sqlite.damaged-<UTC>`` and replaced by a
fresh one holding whatever rows of it still read, its stream going on
(:mod:`agent.salvage`); :meth:`Outbox.take_damage` says so, for the agent to report.
Methods block; the agent calls them from a thread.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.salvage import is_contention, is_damage, salvage_outbox
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
_META: Final = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
_ADDED: Final = (
    # Columns later versions added, each with what an older file's rows get.
    ("dropped", "INTEGER NOT NULL DEFAULT 0"),  # the event cap
    ("sent", "INTEGER NOT NULL DEFAULT 0"),  # handed to the client: never merged
    ("seq", "INTEGER"),  # a numbered summary's first number (NULL: an event, a legacy row)
    ("last_seq", "INTEGER"),
    ("tries", "INTEGER NOT NULL DEFAULT 0"),  # PUBACKs without the coordinator's ack
    ("due", "REAL NOT NULL DEFAULT 0"),  # not sent again before (the caller's clock)
)


@dataclass(frozen=True, kw_only=True)
class OutboxItem:
    id: int
    kind: str
    topic: str
    payload: bytes


class Outbox:
    """A bounded, durable FIFO of messages waiting for their acknowledgement."""

    def __init__(
        self,
        path: Path,
        *,
        max_items: int = 5000,
        max_events: int = 1000,
        busy_timeout_s: float = 5.0,
        resend_s: float = 30.0,
        resend_max_s: float = 600.0,
    ) -> None:
        """``busy_timeout_s``: how long a call waits for another writer holding the
        file's lock before it fails with "database is locked" (SQLite's own default).
        ``resend_s``: how long a summary the broker took waits for the coordinator's ack
        before it is sent again; doubled on every try, up to ``resend_max_s``."""
        if max_items < 4:
            msg = "max_items must be at least 4"
            raise ValueError(msg)
        if max_events < 1:
            msg = "max_events must be at least 1"
            raise ValueError(msg)
        if not 0 < resend_s <= resend_max_s:
            msg = "need 0 < resend_s <= resend_max_s"
            raise ValueError(msg)
        self._resend_s = resend_s
        self._resend_max_s = resend_max_s
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
            if not is_damage(exc):
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
            db.execute(_META)
            columns = {row[1] for row in db.execute("PRAGMA table_info(outbox)")}
            for name, decl in _ADDED:
                if name not in columns:  # an outbox written by an earlier version
                    db.execute(f"ALTER TABLE outbox ADD COLUMN {name} {decl}")
            # A new process: whatever waited for an ack may have been lost with the
            # broker meanwhile, and ``due`` is on the last process's clock.
            db.execute("UPDATE outbox SET due = 0 WHERE due != 0")
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
        rows, meta = (
            salvage_outbox(aside, self._max_items + self._max_events) if salvage else ([], {})
        )
        fresh = self._connect()
        try:
            fresh.execute("BEGIN IMMEDIATE")
            fresh.executemany(
                "INSERT INTO outbox (kind, topic, payload, dropped, sent, seq, last_seq, tries)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            # The stream goes on: the coordinator counts its numbers where it was.
            fresh.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())
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
                if is_damage(exc):
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

    def append_summary(self, topic: str, summary: TelemetrySummary) -> TelemetrySummary:
        """Store one telemetry window, numbered next in this outbox's stream; returns it
        as stored."""
        stored: list[TelemetrySummary] = []

        def number(db: sqlite3.Connection) -> tuple[bytes, int]:
            stream, seq = _next_number(db)
            (low,) = db.execute("SELECT MIN(seq) FROM outbox WHERE seq IS NOT NULL").fetchone()
            numbered = summary.model_copy(
                update={"stream": stream, "seq": seq, "last_seq": seq, "base": low or seq}
            )
            stored.append(numbered)
            return encode(numbered), seq

        self._append(TELEMETRY, topic, lambda _dropped: b"", number=number)
        return stored[-1]

    def append_event(self, topic: str, build: Callable[[int], bytes]) -> int:
        """Store one event; beyond the event cap the oldest queued events make room.

        ``build(dropped)`` makes the payload, told how many events were dropped since
        the last event that said so (0 mostly). Returns that number.
        """
        return self._append(EVENT, topic, build)

    def _append(
        self,
        kind: str,
        topic: str,
        build: Callable[[int], bytes],
        *,
        number: Callable[[sqlite3.Connection], tuple[bytes, int]] | None = None,
    ) -> int:
        with self._guard() as db:
            db.execute("BEGIN IMMEDIATE")  # waits out another writer, or raises
            try:
                dropped = self._make_room_for_event(db) if kind == EVENT else 0
                merges = 0
                (count,) = db.execute("SELECT COUNT(*) FROM outbox").fetchone()
                if count >= self._max_items:
                    merges = self._coarsen(db)
                payload, seq = (build(dropped), None) if number is None else number(db)
                db.execute(
                    "INSERT INTO outbox (kind, topic, payload, dropped, seq, last_seq)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (kind, topic, payload, dropped, seq, seq),
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

    def peek(self, limit: int, *, now: float = math.inf) -> list[OutboxItem]:
        """The oldest ``limit`` messages due at ``now`` (all by default), oldest first;
        numbered summaries carry the lowest number held now as their ``base``."""
        with self._guard() as db:
            rows = db.execute(
                "SELECT id, kind, topic, payload, seq FROM outbox WHERE due <= ? "
                "ORDER BY id LIMIT ?",
                (now, limit),
            ).fetchall()
            (low,) = db.execute("SELECT MIN(seq) FROM outbox WHERE seq IS NOT NULL").fetchone()
            self._leased_upto = rows[-1][0] if rows else 0
            self._leased_from = self._file
        return [
            OutboxItem(
                id=r[0],
                kind=r[1],
                topic=r[2],
                payload=bytes(r[3]) if r[4] is None else _based(bytes(r[3]), low),
            )
            for r in rows
        ]

    def settle(self, acked: list[int], unacked: list[int], *, now: float = 0.0) -> None:
        """Settle the batch peek() handed out. Events (and summaries of an earlier
        version, not numbered) the broker acknowledged are forgotten; numbered summaries
        it acknowledged wait for the coordinator's ack until their ``due`` time (``now``
        plus the resend backoff). Every row handed to the client is marked sent: it may
        still be delivered as it is, so it is never merged nor dropped from now on."""
        with self._guard() as db:
            if self._leased_from != self._file:
                # The batch came from a file since replaced (damaged): its ids name other
                # rows now. What it recovered is sent again; duplicates are dropped.
                self._leased_upto = 0
                return
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("UPDATE outbox SET sent = 1 WHERE id = ?", [(i,) for i in unacked])
                db.executemany(
                    "DELETE FROM outbox WHERE id = ? AND seq IS NULL", [(i,) for i in acked]
                )
                db.executemany(
                    # The backoff doubles at most 20 times: 2**20 · resend_s is past any cap.
                    "UPDATE outbox SET sent = 1, tries = tries + 1, "
                    "due = ? + min(?, ? * (1 << min(tries, 20))) WHERE id = ?",
                    [(now, self._resend_max_s, self._resend_s, i) for i in acked],
                )
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise
            self._leased_upto = 0  # settled: what was not acked is re-peeked

    def acknowledge(self, stream: str, seq: int) -> int:
        """The coordinator counted every summary of ``stream`` numbered up to ``seq``:
        forget those (an ack of another stream, an earlier outbox's, is ignored).
        Returns how many rows went."""
        with self._guard() as db:
            cursor = db.execute(
                "DELETE FROM outbox WHERE seq IS NOT NULL AND last_seq <= ? "
                "AND ? = (SELECT value FROM meta WHERE key = 'stream')",
                (seq, stream),
            )
            return int(cursor.rowcount)

    def due_again(self) -> None:
        """Every summary waiting for the coordinator's ack is due now (a reconnect: the
        broker may have lost what it acknowledged)."""
        with self._guard() as db:
            db.execute("UPDATE outbox SET due = 0 WHERE due != 0")

    def next_due(self) -> float | None:
        """When the next summary waiting for an ack is due again; None if none waits."""
        with self._guard() as db:
            (due,) = db.execute("SELECT MIN(due) FROM outbox WHERE due != 0").fetchone()
            return None if due is None else float(due)

    def unsent(self) -> int:
        """Rows the broker has not acknowledged yet."""
        with self._guard() as db:
            (count,) = db.execute("SELECT COUNT(*) FROM outbox WHERE tries = 0").fetchone()
            return int(count)

    def _coarsen(self, db: sqlite3.Connection) -> int:
        """Merge the oldest half of the telemetry rows pairwise (inside the caller's
        transaction), each only with the next number of its stream; returns how many
        merges."""
        rows = db.execute(
            "SELECT id, topic, payload, seq, last_seq FROM outbox "
            "WHERE kind = ? AND sent = 0 AND id > ? ORDER BY id LIMIT ?",
            (TELEMETRY, self._leased_upto, max(2, self._max_items // 2)),
        ).fetchall()
        merges = 0
        index = 0
        # Only events (or rows in flight or sent) may be queued: they may exceed the cap
        # rather than be dropped (events have their own cap).
        while index + 1 < len(rows):
            (id_a, topic, pay_a, _, last_a), (id_b, _, pay_b, seq_b, last_b) = rows[
                index : index + 2
            ]
            if (last_a is None) != (seq_b is None) or (seq_b is not None and seq_b != last_a + 1):
                index += 1  # not adjacent: a gap, or a legacy row beside a numbered one
                continue
            merged = merge_summaries(
                decode(bytes(pay_a), TelemetrySummary), decode(bytes(pay_b), TelemetrySummary)
            )
            db.execute(
                "UPDATE outbox SET payload = ?, topic = ?, last_seq = ? WHERE id = ?",
                (encode(merged), topic, last_b, id_a),
            )
            db.execute("DELETE FROM outbox WHERE id = ?", (id_b,))
            merges += 1
            index += 2
        return merges


def _rollback(db: sqlite3.Connection) -> None:
    # SQLite may have rolled back already (a full disk does that): nothing to undo.
    with contextlib.suppress(sqlite3.Error):
        db.execute("ROLLBACK")


def _next_number(db: sqlite3.Connection) -> tuple[str, int]:
    """The stream and the next number, taken (inside the caller's transaction); the
    stream is made on first use."""
    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    stream = meta.get("stream")
    seq = int(meta.get("next_seq", 1))
    if stream is None:
        stream = uuid.uuid4().hex
        db.execute("INSERT INTO meta (key, value) VALUES ('stream', ?)", (stream,))
    db.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('next_seq', ?)",
        (str(seq + 1),),
    )
    return stream, seq


def _based(payload: bytes, low: int) -> bytes:
    """A numbered summary as it is sent now: ``base`` is the lowest number held."""
    summary = decode(payload, TelemetrySummary)
    if summary.base == low or summary.seq is None or low > summary.seq:
        return payload
    return encode(summary.model_copy(update={"base": low}))
