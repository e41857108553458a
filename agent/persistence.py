"""Keeping the agent's state file: what it holds in memory, written in order.

Writes run in one thread of their own, one at a time and in order, even when the
coroutine that asked for one was cancelled meanwhile (the store is not thread-safe).
Writers queue on a lock and each writes whatever is newest when its turn comes, so the
file never ends older than memory. A failed write (disk full) is told to the engine as
storage trouble: memory stays right and the next write catches up.

A write costs one fsync, and only a change that must survive a crash is written at
once: what the device runs, knows good, refuses, soaks, and the trust it holds. The
applied manifest, its seq and the last health report (:data:`LAZY`) come back with the
retained topics after a crash, so a change of those alone waits in memory for the next
write or the stop (a manifest that does not change the device's target costs no fsync).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

from agent.events import (
    Desired,
    EngineEvent,
    FailedRelease,
    Memory,
    StorageFailed,
    StorageOk,
    StoragePart,
)
from agent.store import AgentStore, PersistedState, SoakRecord

__all__ = ["LAZY", "StateKeeper"]

LAZY: Final = frozenset({"manifest", "applied_seq", "last_health"})
"""Fields of :class:`PersistedState` whose change alone is not written at once."""

log = logging.getLogger(__name__)


class StateKeeper:
    """The state file of one device and its copy in memory (:attr:`state`)."""

    def __init__(
        self,
        path: Path,
        *,
        device_id: str,
        feed: Callable[[EngineEvent], None],
        clock: Callable[[], float],
    ) -> None:
        self._path = path
        self._device_id = device_id
        self._feed = feed
        self._clock = clock
        self._store: AgentStore | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._lock = asyncio.Lock()
        self.state = PersistedState()
        self._written: PersistedState | None = None

    @property
    def is_open(self) -> bool:
        return self._store is not None

    def open(self) -> None:
        """Blocking: make the store (it touches no disk until used)."""
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"{self._device_id}-store")
        self._store = self._thread.submit(AgentStore, self._path).result()

    def close(self) -> None:
        """Blocking: wait for the writes queued, then end the store's thread."""
        if self._thread is not None and self._store is not None:
            self._thread.submit(self._store.close).result()
            self._thread.shutdown(wait=True)

    async def load(self) -> PersistedState:
        """Read the file into memory.

        Raises:
            DamagedFileError: the file is damaged; memory is a fresh state, and the
                next write replaces the file.
            OSError: the file cannot be read (memory is a fresh state).
        """
        assert self._store is not None
        loop = asyncio.get_running_loop()
        self.state = await loop.run_in_executor(self._thread, self._store.load)
        self._written = self.state
        return self.state

    def remember(self, **changes: object) -> None:
        """Change the state in memory; :meth:`write` makes it durable."""
        self.state = self.state.model_copy(update=changes)

    def remember_memory(self, memory: Memory) -> None:
        """Take the engine's :class:`Memory` into the state."""
        self.remember(
            active=memory.active,
            known_good=memory.known_good,
            failed=tuple(f.stored() for f in memory.failed),
            last_health=memory.last_health,
            soaking=_record(memory.soaking),
        )

    @staticmethod
    def memory_of(state: PersistedState) -> Memory:
        failed = (FailedRelease.parse(f) for f in state.failed)
        soaking = state.soaking
        return Memory(
            active=state.active,
            known_good=state.known_good,
            failed=tuple(f for f in failed if f is not None),
            last_health=state.last_health,
            soaking=None
            if soaking is None
            else Desired(soaking.release, soaking.rollout_id, soaking.seq),
        )

    def _must_write(self, state: PersistedState) -> bool:
        written = self._written
        return written is None or not _changed(written, state) <= LAZY

    async def save(self, **changes: object) -> None:
        self.remember(**changes)
        await self.write()

    async def write(self, *, again: bool = False, flush: bool = False) -> None:
        """Write the newest state if a change must survive a crash (``flush``: any
        change, as at a stop; ``again``: even if it was written already)."""
        assert self._store is not None
        store = self._store
        loop = asyncio.get_running_loop()
        async with self._lock:
            if again:
                self._written = None
            state = self.state
            if state is self._written or not (flush or self._must_write(state)):
                return  # a writer before us already wrote it, or it can wait
            try:
                await loop.run_in_executor(self._thread, store.save, state)
            except OSError as exc:
                log.error("%s: state not saved (kept in memory): %s", self._device_id, exc)
                self._feed(StorageFailed(StoragePart.STATE, str(exc), self._clock()))
                return
            self._written = state
        self._feed(StorageOk(StoragePart.STATE, self._clock()))


def _changed(old: PersistedState, new: PersistedState) -> set[str]:
    fields = PersistedState.model_fields
    return {name for name in fields if getattr(old, name) != getattr(new, name)}


def _record(soaking: Desired | None) -> SoakRecord | None:
    if soaking is None or soaking.release is None:
        return None
    return SoakRecord(release=soaking.release, rollout_id=soaking.rollout_id, seq=soaking.seq)
