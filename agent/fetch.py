"""Fetching an artifact over MQTT into the device's artifact store.

Checked chunks go to disk as they come, resuming from those kept by an earlier attempt
(each checked again against the meta: the disk may have changed them); the whole file
is joined and hashed in a thread once none is missing. Bytes that do not match (a bad
meta, corrupt chunks, a joined file of the wrong digest) end the attempt with
:class:`Refetch`: they are unsigned, so they are fetched again, never judged.

The link's dispatcher hands every message on an artifact topic to :meth:`Fetcher.offer`;
each fetch holds at most the chunks of the largest artifact there can be, so a flood of
junk on its topics is dropped (what is retained comes again on the next attempt).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from agent.artifacts import ArtifactKind, ArtifactStore
from agent.events import EngineEvent, StorageFailed, StorageOk, StoragePart
from agent.store import DamagedFileError
from broker.transport import Message, Transport, TransportError
from schemas import ArtifactError, ArtifactRef, Reason, RejectedError, topics
from schemas.artifact import MAX_CHUNK_BYTES, MAX_CHUNKS, ChunkCollector
from schemas.errors import bound_text
from schemas.topics import TopicKind

__all__ = ["Fetcher", "Refetch"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

Damaged = Callable[[DamagedFileError, str], Awaitable[None]]
"""Tells of a damaged file and what became of it."""


class Refetch(Exception):  # noqa: N818 (not an error of the agent: a cue to fetch again)
    """Fetched bytes that do not match: dropped, and fetched again after a backoff.
    The detail is bounded like a rejection's (:data:`schemas.errors.MAX_DETAIL_CHARS`)."""

    def __init__(self, reason: Reason, detail: str) -> None:
        detail = bound_text(detail)
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


def _indexes(indexes: set[int]) -> str:
    shown = sorted(indexes)
    more = f" and {len(shown) - 8} more" if len(shown) > 8 else ""
    return ", ".join(str(i) for i in shown[:8]) + more


class Fetcher:
    """Artifacts of one device, fetched over whatever link is up (``transport()``)."""

    def __init__(
        self,
        store: ArtifactStore,
        *,
        device_id: str,
        transport: Callable[[], Transport | None],
        damaged: Damaged,
        feed: Callable[[EngineEvent], None],
        clock: Callable[[], float],
        timeout_s: float,
        resubscribe_s: float,
    ) -> None:
        self.store = store
        self._device_id = device_id
        self._transport = transport
        self._damaged = damaged
        self._feed = feed
        self._clock = clock
        self._timeout_s = timeout_s
        self._resubscribe_s = resubscribe_s
        self._fetches: dict[str, asyncio.Queue[Message]] = {}

    def offer(self, sha256: str, message: Message) -> None:
        """A message on the topics of artifact ``sha256``: to its fetch, if one runs."""
        queue = self._fetches.get(sha256)
        if queue is not None:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(message)

    async def stored(self, ref: ArtifactRef, kind: ArtifactKind) -> Path | None:
        """The verified file in the store, or None; a damaged one is deleted and told."""
        try:
            return await asyncio.to_thread(self.store.verified, ref, kind)
        except DamagedFileError as exc:
            await self._damaged(exc, "fetched again")
        except OSError as exc:
            log.error("%s: %s store unreadable: %s", self._device_id, kind, exc)
        return None

    async def fetch(self, ref: ArtifactRef, kind: ArtifactKind) -> Path:
        """The verified file for ``ref``, fetched over MQTT when missing.

        Raises:
            Refetch: a bad meta, corrupt chunks, or a joined file of the wrong digest.
            TimeoutError: the artifact did not arrive within the fetch timeout.
            OSError: the store cannot be written (a full or read-only disk).
        """
        path = await self.stored(ref, kind)
        if path is not None:
            return path
        queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=MAX_CHUNKS + 16)
        self._fetches[ref.sha256] = queue
        subscribed: Transport | None = None
        try:
            async with asyncio.timeout(self._timeout_s):
                while subscribed is None:
                    subscribed = await self._subscribe(ref.sha256)
                return await self.collect(ref, kind, queue)
        except TimeoutError as exc:
            msg = f"{kind} artifact {ref.sha256[:12]} not fetched within {self._timeout_s:g} s"
            raise TimeoutError(msg) from exc
        finally:
            del self._fetches[ref.sha256]
            if subscribed is not None and subscribed is self._transport():
                with contextlib.suppress(TransportError):
                    await subscribed.unsubscribe(topics.artifact_chunks(ref.sha256))

    async def _subscribe(self, sha256: str) -> Transport | None:
        transport = self._transport()
        if transport is not None:
            try:
                await transport.subscribe(topics.artifact_chunks(sha256))
            except TransportError as exc:
                log.info("%s: subscribe failed, retrying: %s", self._device_id, exc)
            else:
                return transport
        await asyncio.sleep(self._resubscribe_s)
        return None

    async def collect(
        self, ref: ArtifactRef, kind: ArtifactKind, queue: asyncio.Queue[Message]
    ) -> Path:
        """Collect ``ref`` from the messages of ``queue`` (see the module's docstring).

        A corrupt chunk is dropped and the rest collected: once every chunk was seen and
        some are still missing, the attempt ends (:class:`Refetch`) so that a later one
        fetches them again; so does a meta that does not describe ``ref``.

        Raises:
            Refetch: see above; or the joined file does not hash right.
            OSError: the store cannot be written.
        """
        attempt = _Attempt(self, ref)
        while True:
            message = await queue.get()
            await attempt.take(message)
            path = await attempt.finished(kind)
            if path is not None:
                return path

    async def keep(self, sha256: str, chunks: list[tuple[int, bytes]]) -> None:
        if not chunks:
            return
        await self._storing(asyncio.to_thread(self.store.keep_chunks, sha256, chunks))

    async def _storing(self, work: Awaitable[_T]) -> _T:
        try:
            result = await work
        except OSError as exc:
            self._feed(StorageFailed(StoragePart.ARTIFACTS, str(exc), self._clock()))
            raise
        self._feed(StorageOk(StoragePart.ARTIFACTS, self._clock()))
        return result

    async def assemble(self, collector: ChunkCollector, kind: ArtifactKind) -> Path:
        meta = collector.meta
        assert meta is not None
        try:
            return await self._storing(asyncio.to_thread(self.store.assemble, meta, kind))
        except ArtifactError as exc:
            raise Refetch(exc.reason, exc.detail) from exc

    async def recheck_kept(self, collector: ChunkCollector) -> set[int]:
        """Check the chunks kept by an earlier fetch against the meta just accepted, and
        hand the good ones to ``collector`` (returns their indexes); one that changed on
        disk is deleted (and told), so it is fetched again in this very attempt."""
        meta = collector.meta
        assert meta is not None
        store = self.store

        def recheck() -> tuple[set[int], set[int]]:
            good: set[int] = set()
            bad: set[int] = set()
            for index in sorted(store.stored_chunks(meta.sha256)):
                data = store.kept_chunk(meta.sha256, index)
                if data is None:
                    continue
                try:
                    collector.add_chunk(index, data)
                except RejectedError:
                    bad.add(index)
                    store.drop_chunk(meta.sha256, index)
                else:
                    good.add(index)
            return good, bad

        good, bad = await asyncio.to_thread(recheck)
        if bad:
            folder = store.path(meta.sha256, ArtifactKind.MODEL).parent.parent
            exc = DamagedFileError(
                folder / "partial" / meta.sha256,
                f"kept chunks {_indexes(bad)} fail their sha256 (changed on disk)",
            )
            await self._damaged(exc, "deleted, fetched again")
        return good


class _Attempt:
    """One attempt at collecting an artifact from its messages."""

    def __init__(self, fetcher: Fetcher, ref: ArtifactRef) -> None:
        self._fetcher = fetcher
        self._ref = ref
        self.collector = ChunkCollector(ref.sha256, ref.size)
        # Chunks that come before the meta wait here, bounded like the artifact itself
        # (the collector's own holding would refuse the whole fetch past its bound).
        self._early: dict[int, bytes] = {}
        self._early_bytes = 0
        # No meta has more chunks than this (its smallest chunk size is 1 KiB): a chunk
        # published beyond is junk, ignored rather than let it spoil the fetch.
        self._most_chunks = min(-(-ref.size // 1024), MAX_CHUNKS)
        self._seen: set[int] = set()
        """Indexes whose chunk came (good or not), or that were kept good before."""
        self._corrupt: set[int] = set()

    async def take(self, message: Message) -> None:
        parsed = topics.parse(message.topic)
        if parsed.kind is TopicKind.ARTIFACT_META:
            await self._meta(message.payload)
        elif parsed.index is not None and parsed.index < self._most_chunks:
            self._seen.add(parsed.index)
            if self.collector.meta is not None:
                await self._offer(parsed.index, message.payload)
            else:
                self._hold(parsed.index, message.payload)

    async def _meta(self, payload: bytes) -> None:
        ref = self._ref
        try:
            await asyncio.to_thread(self.collector.add_meta, payload)
        except RejectedError as exc:
            raise Refetch(exc.reason, f"meta of {ref.sha256[:12]}: {exc.detail}") from exc
        self._seen |= await self._fetcher.recheck_kept(self.collector)
        held, self._early = self._early, {}
        for index, data in sorted(held.items()):
            await self._offer(index, data)

    def _hold(self, index: int, data: bytes) -> None:
        # The latest publish wins, as it does in the broker's retained store.
        size = self._early_bytes - len(self._early.get(index, b"")) + len(data)
        if size <= self._ref.size + MAX_CHUNK_BYTES:
            self._early[index] = data
            self._early_bytes = size

    async def _offer(self, index: int, data: bytes) -> None:
        meta = self.collector.meta
        if meta is not None and index >= len(meta.chunks):
            return  # junk past the artifact's end: not a chunk of it
        try:
            accepted = await asyncio.to_thread(self.collector.add_chunk, index, data)
        except RejectedError:
            self._corrupt.add(index)
            return
        self._corrupt.discard(index)
        await self._fetcher.keep(self._ref.sha256, accepted)

    async def finished(self, kind: ArtifactKind) -> Path | None:
        """The file once complete; None while chunks are missing.

        Raises:
            Refetch: every chunk was seen and some are corrupt.
        """
        meta = self.collector.meta
        if meta is None:
            return None
        if self.collector.complete:
            return await self._fetcher.assemble(self.collector, kind)
        if self._corrupt and self._seen.issuperset(range(len(meta.chunks))):
            raise Refetch(
                Reason.CHUNK_CORRUPT,
                f"chunks {_indexes(self._corrupt)} of {self._ref.sha256[:12]} fail their sha256",
            )
        return None
