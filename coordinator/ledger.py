"""The coordinator's telemetry ledger: each device's count, stored, then acknowledged.

The ingest hands every telemetry summary to :meth:`TelemetryLedger.offer` on the event
loop: a dict lookup and :func:`coordinator.telemetry.judge`, nothing more. Marks that
changed wait in ``dirty``; :meth:`TelemetryLedger.run` commits them as one group every
``commit_s`` in a thread (SQLite, WAL, ``synchronous=FULL``: a committed mark survives a
power cut), and only then publishes each changed device's :class:`TelemetryAck`, retained,
on ``devices/{id}/ack``: one retained message per device, replaced by the next. A device
deletes what an ack covers, so nothing it sent is forgotten before this file holds it. A
summary counted before (a duplicate, an early or stale one) gets its device's stored ack
sent again, once per commit at most: the device may have missed the last one (a broker
that crashed before saving it). Acks that the broker does not take wait for the next link.

The store is one row per device (``telemetry.sqlite`` in the data folder), beside the
TinyDB store that keeps few, rare writes. A damaged file is moved aside and begun anew:
the devices' ``base`` then moves each mark past what they no longer hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from broker.transport import Transport, TransportError
from coordinator.metrics import Counters
from coordinator.telemetry import Mark, Verdict, count_unnumbered, judge
from schemas import TelemetryAck, TelemetrySummary, encode, topics

__all__ = ["TELEMETRY_FILENAME", "LedgerSettings", "TelemetryLedger", "TelemetryStore"]

log = logging.getLogger(__name__)

TELEMETRY_FILENAME: Final = "telemetry.sqlite"
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS marks (
    device_id TEXT PRIMARY KEY,
    stream TEXT,
    seq INTEGER NOT NULL,
    inferences INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    windows INTEGER NOT NULL,
    retired TEXT NOT NULL
)
"""


class TelemetryStore:
    """One row per device. Blocking: called from threads, one at a time (a lock)."""

    def __init__(self, path: Path) -> None:
        """Open (or create) the store; a damaged file is moved aside and begun anew.

        Raises:
            sqlite3.Error, OSError: the folder is not usable.
        """
        self.path = path
        self._lock = threading.Lock()
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as exc:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            aside = path.with_name(f"{path.name}.damaged-{stamp}")
            path.replace(aside)
            log.error("coordinator: telemetry store %s damaged (%s); moved to %s", path, exc, aside)
            self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(_SCHEMA)
            db.execute("SELECT count(*) FROM marks").fetchone()
        except BaseException:
            db.close()
            raise
        return db

    def load(self) -> dict[str, Mark]:
        with self._lock:
            rows = self._db.execute(
                "SELECT device_id, stream, seq, inferences, errors, windows, retired FROM marks"
            ).fetchall()
        return {
            str(r[0]): Mark(
                stream=r[1],
                seq=int(r[2]),
                inferences=int(r[3]),
                errors=int(r[4]),
                windows=int(r[5]),
                retired=tuple(str(r[6]).split()),
            )
            for r in rows
        }

    def save(self, marks: Mapping[str, Mark]) -> None:
        """Write every mark in one transaction (a group commit)."""
        rows = [
            (d, m.stream, m.seq, m.inferences, m.errors, m.windows, " ".join(m.retired))
            for d, m in marks.items()
        ]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR REPLACE INTO marks (device_id, stream, seq, inferences, errors, "
                    "windows, retired) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()


@dataclass(frozen=True, kw_only=True)
class LedgerSettings:
    commit_s: float = 0.25
    """How long changed marks wait to be committed as one group."""
    ack_window: int = 256
    """Acks in flight at once."""
    unnumbered_kept: int = 100_000
    """Ids of unnumbered summaries remembered to drop their redeliveries."""

    def __post_init__(self) -> None:
        if self.commit_s <= 0 or self.ack_window < 1 or self.unnumbered_kept < 1:
            msg = "commit_s must be positive, ack_window and unnumbered_kept at least 1"
            raise ValueError(msg)


_EMPTY: Final = Mark()


class TelemetryLedger:
    def __init__(
        self,
        path: Path,
        *,
        counters: Counters,
        settings: LedgerSettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = path
        self._counters = counters
        self._settings = settings or LedgerSettings()
        self._clock = clock
        self._store: TelemetryStore | None = None
        self._marks: dict[str, Mark] = {}
        """Every device's mark, counted or not yet committed."""
        self._committed: dict[str, Mark] = {}
        self._dirty: dict[str, Mark] = {}
        self._reack: set[str] = set()
        self._to_ack: dict[str, Mark] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._wake = asyncio.Event()
        self._failing = False

    async def open(self) -> None:
        """Open the store and read every mark (in a thread).

        Raises:
            sqlite3.Error, OSError: the data folder is not usable.
        """
        self._store = await asyncio.to_thread(TelemetryStore, self._path)
        self._committed = await asyncio.to_thread(self._store.load)
        self._marks = dict(self._committed)

    def mark(self, device_id: str) -> Mark | None:
        """A device's count as known now (committed or about to be)."""
        return self._marks.get(device_id)

    def committed(self, device_id: str) -> Mark | None:
        """A device's count as stored."""
        return self._committed.get(device_id)

    # -- on the event loop ------------------------------------------------------------

    def offer(self, summary: TelemetrySummary) -> Verdict:
        """Count one summary (its device id checked by the caller) if it is due."""
        device = summary.device_id
        mark = self._marks.get(device, _EMPTY)
        counters = self._counters
        if summary.stream is None:
            return self._offer_unnumbered(mark, summary)
        judged = judge(mark, summary)
        counters.telemetry_skipped += judged.skipped
        if judged.mark != mark:
            self._change(device, judged.mark)
        match judged.verdict:
            case Verdict.COUNTED:
                counters.telemetry_counted += 1
            case Verdict.DUPLICATE:
                counters.telemetry_duplicates += 1
            case Verdict.EARLY:
                counters.telemetry_early += 1
            case Verdict.OVERLAP:
                counters.telemetry_overlaps += 1
            case Verdict.STALE:
                counters.telemetry_stale += 1
        if judged.verdict is not Verdict.COUNTED and device in self._committed:
            self._reack.add(device)
            self._wake.set()
        return judged.verdict

    def _offer_unnumbered(self, mark: Mark, summary: TelemetrySummary) -> Verdict:
        """A summary of an agent before end-to-end delivery: counted once by its id
        (remembered as long as ``unnumbered_kept`` allows), never acknowledged."""
        if summary.summary_id in self._seen:
            self._counters.telemetry_duplicates += 1
            return Verdict.DUPLICATE
        self._seen[summary.summary_id] = None
        if len(self._seen) > self._settings.unnumbered_kept:
            self._seen.popitem(last=False)
        self._counters.telemetry_unnumbered += 1
        self._change(summary.device_id, count_unnumbered(mark, summary))
        return Verdict.COUNTED

    def _change(self, device: str, mark: Mark) -> None:
        self._marks[device] = mark
        self._dirty[device] = mark
        self._wake.set()

    # -- the committer ----------------------------------------------------------------

    async def run(self, transport: Callable[[], Transport | None]) -> None:
        """Commit changed marks as groups and publish their acks, until cancelled."""
        while True:
            await self._wake.wait()
            await asyncio.sleep(self._settings.commit_s)  # the group gathers
            self._wake.clear()
            try:
                await self.commit()
                await self.publish_acks(transport())
            except Exception:  # a bug must not stop the counting: logged, next round
                log.exception("coordinator: telemetry round failed")
                self._wake.set()
            if self._to_ack:
                self._wake.set()  # not linked, or refused: tried again next round

    async def commit(self) -> None:
        """Store every changed mark in one transaction (in a thread); what it stored is
        then due for an ack. A failure keeps them for the next round."""
        store = self._store
        if store is None or not self._dirty:
            self._queue_reacks()
            return
        batch, self._dirty = self._dirty, {}
        started = time.perf_counter()
        work = asyncio.ensure_future(asyncio.to_thread(store.save, batch))
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            await asyncio.wait([work])  # a stop lets the write finish
            raise
        except (sqlite3.Error, OSError) as exc:
            # Kept for the next round; told once per run of failures (a full disk would
            # otherwise log every round).
            if not self._failing:
                log.error("coordinator: telemetry not committed, retrying: %s", exc)
            self._failing = True
            self._counters.telemetry_commit_failures += 1
            self._dirty = {d: self._marks[d] for d in (*batch, *self._dirty)}
            self._wake.set()
            return
        self._counters.telemetry_commit_writes.observe(time.perf_counter() - started)
        if self._failing:
            log.warning("coordinator: telemetry committed again")
        self._failing = False
        self._counters.telemetry_commits += 1
        self._committed.update(batch)
        for device, mark in batch.items():
            if mark.stream is not None:
                self._to_ack[device] = mark
        self._queue_reacks()

    def _queue_reacks(self) -> None:
        for device in self._reack:
            mark = self._committed.get(device)
            if mark is not None and mark.stream is not None:
                self._to_ack.setdefault(device, mark)
        self._reack.clear()

    async def publish_acks(self, transport: Transport | None) -> None:
        """Publish the acks due (retained, ``ack_window`` at a time); what the broker
        does not take waits for the next round. Nothing without a link."""
        if transport is None or not transport.connected or not self._to_ack:
            return
        acks, self._to_ack = self._to_ack, {}
        window = asyncio.Semaphore(self._settings.ack_window)
        at = self._clock()

        async def one(device: str, mark: Mark) -> None:
            assert mark.stream is not None  # only numbered marks are acknowledged
            ack = TelemetryAck(device_id=device, stream=mark.stream, seq=mark.seq, at=at)
            async with window:
                try:
                    await transport.publish(topics.device_ack(device), encode(ack), retain=True)
                except TransportError as exc:
                    self._counters.acks_failed += 1
                    self._to_ack.setdefault(device, mark)  # a newer one may wait already
                    log.debug("coordinator: ack to %s not published: %s", device, exc)
                else:
                    self._counters.acks_published += 1

        await asyncio.gather(*(one(d, m) for d, m in acks.items()))

    async def close(self) -> None:
        """Commit what is left and close the store (acks go out from the next process,
        when the devices send those summaries again)."""
        await self.commit()
        if self._store is not None:
            await asyncio.to_thread(self._store.close)
            self._store = None
