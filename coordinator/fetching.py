"""Fetching a candidate's artifact from the broker, checked, and keeping a copy.

One fetch per artifact, shared by every spec that names it. Sources are the
operator's staged upload and ``artifacts/`` (where the coordinator publishes); a meta
or chunk that fails its check is dropped, not fatal: the other source may hold the
genuine one. Hashing and joining run in threads, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from broker.transport import Message, Transport, TransportError
from coordinator.core import Core
from schemas import ArtifactError, ArtifactRef, Reason, RejectedError, topics
from schemas.artifact import MAX_CHUNK_BYTES, ChunkCollector
from schemas.codec import MAX_MESSAGE_BYTES
from schemas.errors import bound_text
from schemas.topics import TopicKind

__all__ = ["Fetcher"]

log = logging.getLogger(__name__)

_META_KINDS = (TopicKind.ARTIFACT_META, TopicKind.STAGING_META)


@dataclass
class _Feed:
    """Artifact messages routed to one fetch, bounded in bytes."""

    limit: int
    queue: asyncio.Queue[Message | None] = field(default_factory=asyncio.Queue)
    held: int = 0
    overflow: bool = False

    def offer(self, message: Message) -> None:
        if self.overflow:
            return
        if self.held + len(message.payload) > self.limit:
            self.overflow = True
            self.queue.put_nowait(None)
            return
        self.held += len(message.payload)
        self.queue.put_nowait(message)

    async def get(self) -> Message:
        message = await self.queue.get()
        if message is None:
            raise ArtifactError(Reason.OVERSIZED, "more artifact messages than the artifact")
        self.held -= len(message.payload)
        return message


@dataclass
class _Attempt:
    """One fetch's collection: chunks before a meta are kept apart, so that one bad
    chunk never costs the rest."""

    collector: ChunkCollector
    chunks: dict[int, bytes] = field(default_factory=dict)
    early: dict[int, list[bytes]] = field(default_factory=dict)
    meta_payload: bytes = b""
    problem: RejectedError | None = None

    async def take(self, message: Message) -> None:
        """Raises: RejectedError: a meta or chunk that fails its check."""
        parsed = topics.parse(message.topic)
        collector = self.collector
        if parsed.kind in _META_KINDS:
            if collector.meta is not None:
                return
            await asyncio.to_thread(collector.add_meta, message.payload)
            self.meta_payload = message.payload
            offered, self.early = self.early, {}
            for index, datas in sorted(offered.items()):
                for data in datas:
                    if index not in self.chunks:
                        await self._offer(index, data)
        elif parsed.index is not None and parsed.index not in self.chunks:
            if collector.meta is None:
                self.early.setdefault(parsed.index, []).append(message.payload)
            else:
                await self._offer(parsed.index, message.payload)

    async def _offer(self, index: int, data: bytes) -> None:
        """Raises: ArtifactError (CHUNK_CORRUPT) for a chunk that fails its check."""
        self.chunks.update(await asyncio.to_thread(self.collector.add_chunk, index, data))


class Fetcher:
    def __init__(self, core: Core) -> None:
        self._core = core
        self._tasks: dict[str, asyncio.Task[bytes]] = {}
        self._feeds: dict[str, _Feed] = {}

    def offer(self, message: Message, sha256: str) -> None:
        """An artifact or staging message, for the fetch of ``sha256`` if one runs."""
        feed = self._feeds.get(sha256)
        if feed is not None and message.payload:
            feed.offer(message)

    def fetching(self, sha256: str) -> bool:
        return sha256 in self._tasks

    def cancel(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()

    async def get(self, ref: ArtifactRef) -> bytes:
        """The artifact's checked bytes, from our own copy or fetched once for every
        spec that names it.

        Raises:
            ArtifactError: incomplete in time, with a meta or chunk that failed its
                check; or of another size than ``ref`` says.
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
        # Both sources, and the standing subscriptions too, may deliver each message.
        feed = _Feed(limit=4 * (ref.size + MAX_CHUNK_BYTES) + 2 * MAX_MESSAGE_BYTES)
        self._feeds[ref.sha256] = feed
        filters = (topics.staging_chunks(ref.sha256), topics.artifact_chunks(ref.sha256))
        timeout = core.config.artifact_timeout_s
        attempt = _Attempt(ChunkCollector(ref.sha256, ref.size))
        try:
            async with _link_timeout(transport, transport.generation, timeout):
                await transport.subscribe(*filters, timeout=timeout)
                while not attempt.collector.complete:
                    message = await feed.get()
                    try:
                        await attempt.take(message)
                    except RejectedError as exc:
                        log.info("coordinator: dropped %s: %s", bound_text(message.topic), exc)
                        attempt.problem = exc
            return await self._keep(ref, attempt)
        except TimeoutError:
            if attempt.problem is None:
                raise
            raise ArtifactError(
                attempt.problem.reason,
                f"incomplete after {timeout:g} s; {attempt.problem.detail}",
            ) from None
        finally:
            if self._feeds.get(ref.sha256) is feed:
                del self._feeds[ref.sha256]
            with contextlib.suppress(TransportError, RuntimeError):  # RuntimeError: closed
                await transport.unsubscribe(*filters, timeout=core.limits.unsubscribe_s)

    async def _keep(self, ref: ArtifactRef, attempt: _Attempt) -> bytes:
        core = self._core
        meta = attempt.collector.meta
        assert meta is not None  # complete implies a meta
        chunks = [attempt.chunks[i] for i in range(len(meta.chunks))]
        data = await asyncio.to_thread(b"".join, chunks)
        # put() checks the whole against the meta (sha256 and size, which the collector
        # checked against the spec) before it keeps anything.
        async with core.artifact_lock:
            await asyncio.to_thread(core.artifacts.put, attempt.meta_payload, data)
        core.copies[ref.sha256] = (meta, attempt.meta_payload)
        return data


@contextlib.asynccontextmanager
async def _link_timeout(
    transport: Transport, generation: int, timeout: float
) -> AsyncIterator[None]:
    """``asyncio.timeout`` that blames the link when it dropped meanwhile: a fetch cut
    short by a disconnect says nothing about the artifact.

    Raises:
        TransportError: timed out after the connection was lost or replaced.
        TimeoutError: timed out on a link that stayed up.
    """
    try:
        async with asyncio.timeout(timeout):
            yield
    except TimeoutError:
        if not transport.connected or transport.generation != generation:
            msg = "the link to the broker dropped while fetching the artifact"
            raise TransportError(msg) from None
        raise
