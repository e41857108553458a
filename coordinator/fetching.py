"""A candidate's artifacts for validation: the coordinator's kept copy, or fetched
through the shared :class:`broker.fetch.ArtifactFetcher` and kept.

Sources are the operator's staged upload and ``artifacts/`` (where the coordinator
publishes); a meta or chunk that fails its check is dropped, not fatal
(``end_on_corrupt=False``): the other source may hold the genuine one. Chunks are kept in
memory while they come; the join, the check of the whole and the write to the
:class:`~coordinator.artifacts.ArtifactStore` happen in the fetcher's thread.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from broker.fetch import ArtifactFetcher
from broker.transport import Message, TransportError
from coordinator.artifacts import ArtifactStore
from coordinator.core import Core
from schemas import ArtifactError, ArtifactMeta, ArtifactRef, Reason, topics
from schemas.artifact import ChunkCollector

__all__ = ["Fetcher", "Kept", "MemorySink"]


@dataclass(frozen=True)
class Kept:
    """A fetched artifact, checked and kept."""

    meta: ArtifactMeta
    meta_payload: bytes
    data: bytes


class MemorySink:
    """Chunks of one attempt in memory; the whole checked and kept in the store when
    complete (every method runs in the fetcher's thread)."""

    def __init__(self, store: ArtifactStore) -> None:
        self._store = store
        self._chunks: dict[int, bytes] = {}

    def resume(self, collector: ChunkCollector) -> set[int]:  # noqa: ARG002 (the protocol's)
        """Nothing outlives an attempt: an interrupted fetch starts over."""
        return set()

    def keep(self, chunks: list[tuple[int, bytes]]) -> None:
        self._chunks.update(chunks)

    def finish(self, meta: ArtifactMeta, meta_payload: bytes) -> Kept:
        """Raises: ArtifactError: the whole does not match the meta (``put`` checks it
        before it keeps anything)."""
        data = b"".join(self._chunks[i] for i in range(len(meta.chunks)))
        self._store.put(meta_payload, data)
        return Kept(meta, meta_payload, data)


class Fetcher:
    """One fetch per artifact, shared by every spec that names it."""

    def __init__(self, core: Core) -> None:
        self._core = core
        self._shared = ArtifactFetcher()
        self._tasks: dict[str, asyncio.Task[bytes]] = {}

    def offer(self, message: Message) -> None:
        """An artifact or staging message, for the fetch that wants it (if any)."""
        if message.payload:
            self._shared.offer(message)

    def fetching(self, sha256: str) -> bool:
        return sha256 in self._tasks

    def cancel(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()

    async def get(self, ref: ArtifactRef) -> bytes:
        """The artifact's checked bytes, from our own copy or fetched and kept.

        Raises:
            ArtifactError: of another size than ``ref`` says.
            FetchFailed: incomplete in time, with a meta or chunk that failed its check.
            TimeoutError: the artifact is not (completely) there in time.
            TransportError: the broker could not be asked.
        """
        task = self._tasks.get(ref.sha256)
        if task is None:
            task = asyncio.create_task(self._fetch(ref))
            self._tasks[ref.sha256] = task
            self._core.fetching.add(ref.sha256)
            task.add_done_callback(lambda done: self._done(ref.sha256, done))
        data = await asyncio.shield(task)
        if len(data) != ref.size:
            raise ArtifactError(
                Reason.ARTIFACT_MISMATCH, f"artifact {ref.sha256[:12]} is {len(data)} B"
            )
        return data

    def _done(self, sha256: str, task: asyncio.Task[bytes]) -> None:
        if self._tasks.get(sha256) is task:
            del self._tasks[sha256]
            self._core.fetching.discard(sha256)
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone

    async def _fetch(self, ref: ArtifactRef) -> bytes:
        core = self._core
        stored = await asyncio.to_thread(core.artifacts.get, ref.sha256)
        if stored is not None:
            return stored.data
        transport = core.transport
        if transport is None:
            msg = "not connected"
            raise TransportError(msg)
        kept = await self._shared.fetch(
            transport,
            ref,
            MemorySink(core.artifacts),
            filters=(topics.staging_chunks(ref.sha256), topics.artifact_chunks(ref.sha256)),
            timeout=core.config.artifact_timeout_s,
            end_on_corrupt=False,
        )
        core.copies[ref.sha256] = (kept.meta, kept.meta_payload)
        return kept.data
