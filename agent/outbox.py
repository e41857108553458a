"""The agent's durable store-and-forward queue (SQLite in WAL mode).

Telemetry summaries and events are appended here first and deleted only after the
broker acknowledged them (PUBACK with a success reason code), so a device that is
offline for hours, or restarted, loses nothing.

When the queue reaches its cap, the oldest telemetry summaries are merged pairwise
into coarser ones (see :func:`schemas.telemetry.merge_summaries`): time resolution
drops, counts are conserved. Methods block; the agent calls them from a thread.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from schemas import TelemetrySummary, decode, encode, merge_summaries

__all__ = ["Outbox", "OutboxItem"]

_TELEMETRY: Final = "telemetry"
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL
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

    def __init__(self, path: Path, *, max_items: int = 5000) -> None:
        if max_items < 4:
            msg = "max_items must be at least 4"
            raise ValueError(msg)
        self._max_items = max_items
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: an append that returned survives a power cut, which is the point.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)
        self.coarsened = 0
        """How many merges the cap has forced since this outbox was opened."""
        self._leased_upto = 0
        # Rows up to this id were handed out by peek() and may be on the wire. Until
        # delete() settles that batch, coarsening leaves them alone: merging a queued
        # window into one of them would have its PUBACK delete the window unsent.

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __len__(self) -> int:
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
            return int(count)

    def append(self, kind: str, topic: str, payload: bytes) -> None:
        """Store one message durably, coarsening old telemetry first if full."""
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
            if count >= self._max_items:
                self._coarsen()
            self._db.execute(
                "INSERT INTO outbox (kind, topic, payload) VALUES (?, ?, ?)",
                (kind, topic, payload),
            )

    def append_summary(self, topic: str, summary: TelemetrySummary) -> None:
        self.append(_TELEMETRY, topic, encode(summary))

    def peek(self, limit: int) -> list[OutboxItem]:
        """The oldest ``limit`` messages, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, kind, topic, payload FROM outbox ORDER BY id LIMIT ?", (limit,)
            ).fetchall()
            self._leased_upto = rows[-1][0] if rows else 0
        return [OutboxItem(id=r[0], kind=r[1], topic=r[2], payload=bytes(r[3])) for r in rows]

    def delete(self, ids: list[int]) -> None:
        """Forget messages the broker acknowledged."""
        with self._lock:
            self._leased_upto = 0  # the batch is settled: what was not acked is re-peeked
            if ids:
                self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])

    def _coarsen(self) -> None:
        """Merge the oldest half of the telemetry rows pairwise, in one transaction."""
        rows = self._db.execute(
            "SELECT id, topic, payload FROM outbox WHERE kind = ? AND id > ? ORDER BY id LIMIT ?",
            (_TELEMETRY, self._leased_upto, max(2, self._max_items // 2)),
        ).fetchall()
        if len(rows) < 2:
            # Only events (or rows in flight) are queued: they may exceed the cap
            # rather than be dropped.
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for (id_a, topic, pay_a), (id_b, _, pay_b) in zip(rows[0::2], rows[1::2], strict=False):
                merged = merge_summaries(
                    decode(bytes(pay_a), TelemetrySummary), decode(bytes(pay_b), TelemetrySummary)
                )
                self._db.execute(
                    "UPDATE outbox SET payload = ?, topic = ? WHERE id = ?",
                    (encode(merged), topic, id_a),
                )
                self._db.execute("DELETE FROM outbox WHERE id = ?", (id_b,))
                self.coarsened += 1
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
