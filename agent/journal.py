"""What the agent tells through its outbox: events, damaged files, telemetry windows.

Every outbox call runs in a thread and its success or failure is told to the engine as
storage trouble (a locked database is another writer, not a storage failure). Events the
outbox had to drop (its event cap) or could not store are counted in the next one
stored; a telemetry window the outbox could not take is merged into the next one, so
nothing is lost without a count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import uuid
from collections.abc import Callable
from functools import partial
from typing import TypeVar

from agent.events import Desired, EngineEvent, StorageFailed, StorageOk, StoragePart
from agent.limits import Limits
from agent.outbox import Outbox, is_contention
from agent.runtime import Tally
from agent.store import DamagedFileError, set_aside
from agent.telemetry import TelemetryWindow
from schemas import Event, EventKind, TelemetrySummary, encode, merge_summaries, topics
from schemas.errors import bound_text
from schemas.topics import DeviceChannel

__all__ = ["Journal"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class Journal:
    """The outbox of one device, as the agent's parts write to it. :attr:`ready` is set
    whenever something was queued for the link to send."""

    def __init__(
        self,
        outbox: Outbox,
        *,
        device_id: str,
        feed: Callable[[EngineEvent], None],
        clock: Callable[[], float],
        limits: Limits,
    ) -> None:
        self.outbox = outbox
        self._device_id = device_id
        self._feed = feed
        self._clock = clock
        self._limits = limits
        self.ready = asyncio.Event()
        self.events_lost = 0
        """Events the outbox could not store, told in the next one stored."""
        self._damage: list[str] = []
        """Damaged files found and set aside, told in events once the outbox takes them."""
        self._window = TelemetryWindow(device_id, clock())
        self._window_lock = asyncio.Lock()
        self._held_summary: TelemetrySummary | None = None
        """A window the outbox could not take; merged into the next one."""
        self._coarsened_reported = 0

    async def do(self, call: Callable[[], _T]) -> _T:
        """One outbox call in a thread, its outcome told as storage trouble or health.

        Raises:
            sqlite3.Error, OSError: the call failed.
        """
        try:
            result = await asyncio.to_thread(call)
        except sqlite3.Error as exc:
            if not is_contention(exc):
                self._feed(StorageFailed(StoragePart.OUTBOX, str(exc), self._clock()))
            raise
        except OSError as exc:
            self._feed(StorageFailed(StoragePart.OUTBOX, str(exc), self._clock()))
            raise
        self._feed(StorageOk(StoragePart.OUTBOX, self._clock()))
        return result

    async def emit(
        self, kind: EventKind, reason: str | None, detail: str, desired: Desired | None
    ) -> bool:
        """Queue an event; False when the outbox could not store it."""
        at = self._clock()
        lost, self.events_lost = self.events_lost, 0  # taken: a concurrent emit sees 0
        limits = self._limits

        def build(dropped: int) -> bytes:
            return encode(
                Event(
                    event_id=uuid.uuid4().hex,
                    device_id=self._device_id,
                    kind=kind,
                    reason=None
                    if reason is None
                    else bound_text(reason, limits.event_reason_chars),
                    detail=bound_text(detail, limits.event_detail_chars),
                    dropped_before=dropped + lost,
                    manifest_seq=None if desired is None else desired.seq,
                    release=(
                        None
                        if desired is None or desired.release is None
                        else desired.release.release_id
                    ),
                    at=at,
                )
            )

        topic = topics.device(self._device_id, DeviceChannel.EVENTS)
        try:
            await self.do(partial(self.outbox.append_event, topic, build))
        except (sqlite3.Error, OSError) as exc:
            self.events_lost += lost + 1
            log.error("%s: %s event not stored (%s): %s", self._device_id, kind.value, exc, detail)
            return False
        except BaseException:
            self.events_lost += lost  # not told: the next event tells them
            raise
        self.ready.set()
        return True

    # -- damaged files ----------------------------------------------------------------

    async def damaged(self, exc: DamagedFileError, lost: str, *, set_aside_file: bool) -> None:
        """Tell of a damaged file (moving it aside first when asked): logged now, and an
        event as soon as the outbox takes it."""
        note = f"{exc.path} was damaged ({exc.why})"
        if set_aside_file:
            try:
                aside = await asyncio.to_thread(set_aside, exc.path)
            except OSError as move:
                note += f", not moved aside ({move.strerror})"
            else:
                note += f", moved to {aside.name}"
        note += f"; {lost}"
        log.error("%s: %s", self._device_id, note)
        self._damage.append(bound_text(note, self._limits.event_detail_chars))
        await self.tell_damage()

    async def tell_damage(self) -> None:
        """Queue an event for each damaged file found (by the agent or the outbox)."""
        with contextlib.suppress(sqlite3.Error, OSError):  # told with the next one
            self._damage += await asyncio.to_thread(self.outbox.take_damage)
        while self._damage:
            note = self._damage.pop(0)
            if not await self.emit(EventKind.STORAGE_DAMAGED, None, note, None):
                self._damage.insert(0, note)  # the outbox fails too: told once it works
                return

    # -- telemetry --------------------------------------------------------------------

    def record(self, tally: Tally) -> None:
        self._window.record(tally)

    async def telemetry_loop(self, window_s: float) -> None:
        """Commit a window every ``window_s``; tell when the outbox coarsened windows."""
        while True:
            await asyncio.sleep(window_s)
            try:
                await self.commit_window()
            except (sqlite3.Error, OSError) as exc:
                log.warning("%s: telemetry held for the next window: %s", self._device_id, exc)
                continue
            coarsened = self.outbox.coarsened
            if coarsened > self._coarsened_reported:
                merges = coarsened - self._coarsened_reported
                self._coarsened_reported = coarsened
                await self.emit(
                    EventKind.TELEMETRY_COARSENED,
                    None,
                    f"outbox full: {merges} merges of queued telemetry windows "
                    "(counts kept, time resolution lower)",
                    None,
                )

    async def commit_window(self) -> None:
        """Close the open window and append it to the outbox (merged with one the
        outbox could not take before). One at a time: a stop may commit while the
        telemetry task does.

        Raises:
            sqlite3.Error, OSError: the outbox failed; the summary is held for the next.
        """
        async with self._window_lock:
            summary = self._window.close(self._clock())
            held, self._held_summary = self._held_summary, None
            if held is not None:
                summary = merge_summaries(held, summary)
            if summary.count == 0:
                return
            self._held_summary = summary  # until the outbox has it: nothing is lost
            topic = topics.device(self._device_id, DeviceChannel.TELEMETRY)
            append = asyncio.ensure_future(
                self.do(partial(self.outbox.append_summary, topic, summary))
            )
            try:
                await asyncio.shield(append)
            except asyncio.CancelledError:
                # The thread goes on regardless: learn whether the row was stored, or
                # the summary would be appended twice (held, then committed again).
                with contextlib.suppress(Exception):
                    await append
                if append.done() and not append.cancelled() and append.exception() is None:
                    self._held_summary = None
                raise
            self._held_summary = None
            self.ready.set()
