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
Methods block; the agent calls them from a thread.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from schemas import TelemetrySummary, decode, encode, merge_summaries

__all__ = ["EVENT", "TELEMETRY", "Outbox", "OutboxItem"]

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

    def __init__(self, path: Path, *, max_items: int = 5000, max_events: int = 1000) -> None:
        if max_items < 4:
            msg = "max_items must be at least 4"
            raise ValueError(msg)
        if max_events < 1:
            msg = "max_events must be at least 1"
            raise ValueError(msg)
        self._max_items = max_items
        self._max_events = max_events
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: an append that returned survives a power cut, which is the point.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(outbox)")}
        if "dropped" not in columns:  # an outbox written before events had a cap
            self._db.execute("ALTER TABLE outbox ADD COLUMN dropped INTEGER NOT NULL DEFAULT 0")
        if "sent" not in columns:  # an outbox written before unacked rows were marked
            self._db.execute("ALTER TABLE outbox ADD COLUMN sent INTEGER NOT NULL DEFAULT 0")
        self.coarsened = 0
        """How many merges the cap has forced since this outbox was opened."""
        self._leased_upto = 0
        # Rows up to this id were handed out by peek() and may be on the wire. Until
        # settle() marks what of that batch was not acked, coarsening leaves them alone:
        # merging a queued window into one of them would have its PUBACK delete the
        # window unsent.

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __len__(self) -> int:
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
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
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # waits out another writer, or raises
            try:
                dropped = self._make_room_for_event() if kind == EVENT else 0
                merges = 0
                (count,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
                if count >= self._max_items:
                    merges = self._coarsen()
                self._db.execute(
                    "INSERT INTO outbox (kind, topic, payload, dropped) VALUES (?, ?, ?, ?)",
                    (kind, topic, build(dropped), dropped),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self.coarsened += merges
            return dropped

    def _make_room_for_event(self) -> int:
        """Drop the oldest events beyond the cap (never rows in flight or sent); how many
        went, counting those that the dropped ones reported."""
        (count,) = self._db.execute(
            "SELECT COUNT(*) FROM outbox WHERE kind = ?", (EVENT,)
        ).fetchone()
        excess = count - self._max_events + 1
        if excess <= 0:
            return 0
        rows = self._db.execute(
            "SELECT id, dropped FROM outbox WHERE kind = ? AND sent = 0 AND id > ? "
            "ORDER BY id LIMIT ?",
            (EVENT, self._leased_upto, excess),
        ).fetchall()
        self._db.executemany("DELETE FROM outbox WHERE id = ?", [(r[0],) for r in rows])
        return sum(1 + int(r[1]) for r in rows)

    def peek(self, limit: int) -> list[OutboxItem]:
        """The oldest ``limit`` messages, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, kind, topic, payload FROM outbox ORDER BY id LIMIT ?", (limit,)
            ).fetchall()
            self._leased_upto = rows[-1][0] if rows else 0
        return [OutboxItem(id=r[0], kind=r[1], topic=r[2], payload=bytes(r[3])) for r in rows]

    def settle(self, acked: list[int], unacked: list[int]) -> None:
        """Settle the batch peek() handed out: forget the messages the broker
        acknowledged, and mark those handed to the client but not acknowledged as sent
        (the client may still deliver them as they are: they are never merged nor
        dropped from now on, only sent again)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "UPDATE outbox SET sent = 1 WHERE id = ?", [(i,) for i in unacked]
                )
                self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in acked])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._leased_upto = 0  # settled: what was not acked is re-peeked

    def _coarsen(self) -> int:
        """Merge the oldest half of the telemetry rows pairwise (inside the caller's
        transaction); returns how many merges."""
        rows = self._db.execute(
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
            self._db.execute(
                "UPDATE outbox SET payload = ?, topic = ? WHERE id = ?",
                (encode(merged), topic, id_a),
            )
            self._db.execute("DELETE FROM outbox WHERE id = ?", (id_b,))
            merges += 1
        return merges
