"""The agent's upkeep of its storage: failing parts retried until they heal, and stored
files no release needs any more deleted.

A full, read-only or damaged data folder never stops the agent: every few seconds each
failing part (state file, outbox, artifact store) is tried again, so the device heals by
itself once space or write access is back, whether or not anything else writes meanwhile.
Between updates, the artifact store keeps only what the releases here need.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable

from agent.artifacts import ArtifactStore, files_of
from agent.engine import UpdateEngine
from agent.events import StorageFailed, StorageOk, StoragePart
from agent.journal import Journal
from agent.lifecycle import Stage
from agent.persistence import StateKeeper
from agent.updater import Updater

__all__ = ["Upkeep"]

_BETWEEN_UPDATES = (Stage.SERVING, Stage.IDLE, Stage.DEGRADED)


class Upkeep:
    def __init__(
        self,
        engine: UpdateEngine,
        *,
        keeper: StateKeeper,
        journal: Journal,
        store: ArtifactStore,
        updater: Updater,
        clock: Callable[[], float],
        interval_s: float,
    ) -> None:
        self._engine = engine
        self._keeper = keeper
        self._journal = journal
        self._store = store
        self._updater = updater
        self._clock = clock
        self._interval_s = interval_s
        self._kept: frozenset[str] | None = None

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.heal()
            await self._journal.tell_damage()
            await self.housekeep()

    async def heal(self) -> None:
        """Try each failing part of storage again; the engine hears how it went."""
        trouble = self._engine.trouble
        if StoragePart.STATE in trouble:
            await self._keeper.write(again=True)
        if StoragePart.OUTBOX in trouble:
            with contextlib.suppress(sqlite3.Error, OSError):
                await self._journal.do(self._journal.outbox.probe)
        if StoragePart.ARTIFACTS in trouble:
            try:
                await asyncio.to_thread(self._store.probe)
            except OSError as exc:
                self._updater.feed(StorageFailed(StoragePart.ARTIFACTS, str(exc), self._clock()))
            else:
                self._updater.feed(StorageOk(StoragePart.ARTIFACTS, self._clock()))

    async def housekeep(self) -> None:
        """Delete the stored files no release here needs once they change (the active,
        the previous one kept for a rollback, the candidate), between updates only."""
        engine = self._engine
        if engine.stage not in _BETWEEN_UPDATES:
            return
        slots = (slot.release for slot in self._updater.slots.values())
        keep = files_of((engine.active, engine.desired.release, *slots))
        if self._kept is not None and keep != self._kept:
            with contextlib.suppress(OSError):  # the store's trouble is told by the fetch
                await asyncio.to_thread(self._store.prune, keep)
        self._kept = keep
