"""The one artifact fetcher of the project, used by agents and the coordinator alike.

An artifact is a retained meta and retained chunks (:mod:`schemas.artifact`). A fetch
subscribes to the artifact's topics, checks each chunk against the meta as it comes, hands
the checked ones to a :class:`ChunkSink` (the agent keeps them on disk, the coordinator in
memory) and, once none is missing, lets the sink join, check and store the whole. It then
unsubscribes. Hashing, joining and storing run in threads, never on the event loop.

Bounds, by bytes:

* messages taken from the link and not yet processed share one budget per fetcher
  (``budget_bytes``). Past it a message is dropped, never queued: what is retained comes
  again, so a fetch that dropped some re-subscribes once it has caught up;
* chunks that arrive before their meta are held up to twice the artifact's size plus one
  chunk; more is junk and dropped;
* no index beyond what the smallest chunk size allows is looked at.

The owner routes messages with :meth:`ArtifactFetcher.offer` from its single dispatcher,
so a fetch never competes with the owner for the link's message iterator.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, TypeVar

from broker.transport import Message, Transport, TransportError
from schemas import topics
from schemas.artifact import MAX_CHUNK_BYTES, MAX_CHUNKS, ArtifactMeta, ChunkCollector
from schemas.errors import ArtifactError, Reason, RejectedError, bound_text
from schemas.manifest import ArtifactRef
from schemas.topics import TopicKind

__all__ = [
    "DEFAULT_BUDGET_BYTES",
    "ArtifactFetcher",
    "ChunkSink",
    "FetchFailed",
    "describe_indexes",
]

log = logging.getLogger(__name__)

DEFAULT_BUDGET_BYTES: Final = 32 * 1024 * 1024
"""Bytes of received, unprocessed artifact messages one fetcher holds at most."""
_MIN_CHUNK_BYTES: Final = 1024  # the smallest chunk an ArtifactMeta allows
_META_KINDS: Final = frozenset({TopicKind.ARTIFACT_META, TopicKind.STAGING_META})
_CHUNK_KINDS: Final = frozenset({TopicKind.ARTIFACT_CHUNK, TopicKind.STAGING_CHUNK})
_UNSUBSCRIBE_TIMEOUT_S: Final = 5.0

_T_co = TypeVar("_T_co", covariant=True)
_T = TypeVar("_T")


class ChunkSink(Protocol[_T_co]):
    """Where one fetch keeps what it collected. Every method blocks: the fetcher calls
    them in a thread."""

    def resume(self, collector: ChunkCollector) -> set[int]:
        """Hand chunks kept by an earlier attempt to ``collector.add_chunk`` (the meta was
        just accepted) and return the indexes it accepted; drop those it refused."""
        ...

    def keep(self, chunks: list[tuple[int, bytes]]) -> None:
        """Keep chunks already checked against the meta."""
        ...

    def finish(self, meta: ArtifactMeta, meta_payload: bytes) -> _T_co:
        """Every chunk is kept: join them, check the whole against ``meta`` and store it.

        Raises:
            ArtifactError: the joined bytes do not hash to the meta's sha256.
        """
        ...


class FetchFailed(Exception):  # noqa: N818 (an outcome of a fetch, with the reason it failed)
    """The attempt ended on bad data: a meta for another artifact, chunks that fail their
    hash, or a joined file of the wrong digest. Fetching again may succeed."""

    def __init__(self, reason: Reason, detail: str) -> None:
        self.reason = reason
        self.detail = bound_text(detail)
        super().__init__(f"{reason}: {self.detail}")


@dataclass
class _Attempt:
    ref: ArtifactRef
    filters: tuple[str, ...]
    queue: collections.deque[Message] = field(default_factory=collections.deque)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    dropped: int = 0


@dataclass
class _Progress:
    """What one attempt collected so far."""

    collector: ChunkCollector
    end_on_corrupt: bool
    meta_payload: bytes = b""
    early: dict[int, list[bytes]] = field(default_factory=dict)
    early_bytes: int = 0
    seen: set[int] = field(default_factory=set)
    corrupt: set[int] = field(default_factory=set)
    problem: RejectedError | None = None


class ArtifactFetcher:
    """Fetches artifacts over a :class:`~broker.transport.Transport`, bounded by bytes."""

    def __init__(self, *, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        if budget_bytes < MAX_CHUNK_BYTES:
            msg = f"budget_bytes must hold at least one chunk ({MAX_CHUNK_BYTES} B)"
            raise ValueError(msg)
        self._budget = budget_bytes
        self._queued_bytes = 0
        self._attempts: dict[str, _Attempt] = {}
        self._running: dict[str, asyncio.Task[Any]] = {}

    @property
    def queued_bytes(self) -> int:
        """Bytes received for fetches and not yet processed."""
        return self._queued_bytes

    def offer(self, message: Message) -> bool:
        """Route a message on an artifact's or staging topic to the fetch that wants it.

        Returns False when no fetch wants it, or when the byte budget is full (dropped;
        the fetch re-subscribes for it).
        """
        try:
            parsed = topics.parse(message.topic)
        except RejectedError:
            return False
        if parsed.kind not in _META_KINDS | _CHUNK_KINDS or parsed.name is None:
            return False
        attempt = self._attempts.get(parsed.name)
        if attempt is None:
            return False
        if self._queued_bytes + len(message.payload) > self._budget:
            attempt.dropped += 1
            return False
        attempt.queue.append(message)
        self._queued_bytes += len(message.payload)
        attempt.arrived.set()
        return True

    async def fetch(
        self,
        transport: Transport,
        ref: ArtifactRef,
        sink: ChunkSink[_T],
        *,
        filters: Sequence[str],
        timeout: float,
        end_on_corrupt: bool,
    ) -> _T:
        """The artifact ``ref`` names, collected from ``filters`` into ``sink``.

        A caller asking for an artifact already being fetched joins that attempt (and gets
        what its sink made). ``end_on_corrupt``: end the attempt as soon as every chunk
        was seen and some failed their hash, or the meta is bad (one source: a device);
        else drop the bad data and wait for a genuine copy (several sources).

        Raises:
            FetchFailed: bad data ended the attempt, or it timed out after bad data.
            TimeoutError: the artifact was not (completely) there within ``timeout``.
            TransportError: the link dropped meanwhile, or the broker could not be asked.
            OSError: the sink could not store.
        """
        task = self._running.get(ref.sha256)
        if task is None:
            progress = _Progress(ChunkCollector(ref.sha256, ref.size), end_on_corrupt)
            task = asyncio.create_task(
                self._attempt(transport, _Attempt(ref, tuple(filters)), progress, sink, timeout)
            )
            self._running[ref.sha256] = task
            task.add_done_callback(lambda done: self._done(ref.sha256, done))
        result: _T = await asyncio.shield(task)
        return result

    def _done(self, sha256: str, task: asyncio.Task[Any]) -> None:
        if self._running.get(sha256) is task:
            del self._running[sha256]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone

    async def _attempt(
        self,
        transport: Transport,
        attempt: _Attempt,
        progress: _Progress,
        sink: ChunkSink[_T],
        timeout: float,
    ) -> _T:
        ref, filters = attempt.ref, attempt.filters
        self._attempts[ref.sha256] = attempt
        generation = transport.generation
        try:
            async with asyncio.timeout(timeout):
                await transport.subscribe(*filters, timeout=timeout)
                return await self._collect(transport, attempt, progress, sink)
        except TimeoutError:
            if not transport.connected or transport.generation != generation:
                msg = f"the link to the broker dropped while fetching {ref.sha256[:12]}"
                raise TransportError(msg) from None
            if progress.problem is not None:
                detail = f"incomplete after {timeout:g} s; {progress.problem.detail}"
                raise FetchFailed(progress.problem.reason, detail) from None
            msg = f"artifact {ref.sha256[:12]} not fetched within {timeout:g} s"
            raise TimeoutError(msg) from None
        finally:
            del self._attempts[ref.sha256]
            self._queued_bytes -= sum(len(m.payload) for m in attempt.queue)
            with contextlib.suppress(TransportError, RuntimeError):  # RuntimeError: closed
                await transport.unsubscribe(*filters, timeout=_UNSUBSCRIBE_TIMEOUT_S)

    async def _next(self, transport: Transport, attempt: _Attempt) -> Message:
        while not attempt.queue:
            if attempt.dropped:
                # Caught up after dropping some: what is retained comes again.
                log.info(
                    "fetch of %s dropped %d message(s) over its byte budget: re-subscribing",
                    attempt.ref.sha256[:12],
                    attempt.dropped,
                )
                attempt.dropped = 0
                await transport.unsubscribe(*attempt.filters)
                await transport.subscribe(*attempt.filters)
                continue
            attempt.arrived.clear()
            await attempt.arrived.wait()
        message = attempt.queue.popleft()
        self._queued_bytes -= len(message.payload)
        return message

    async def _collect(
        self,
        transport: Transport,
        attempt: _Attempt,
        progress: _Progress,
        sink: ChunkSink[_T],
    ) -> _T:
        ref = attempt.ref
        # No meta has more chunks than this: an index beyond is junk, not looked at.
        most_chunks = min(-(-ref.size // _MIN_CHUNK_BYTES), MAX_CHUNKS)
        collector = progress.collector
        while True:
            message = await self._next(transport, attempt)
            parsed = topics.parse(message.topic)
            if parsed.kind in _META_KINDS:
                if collector.meta is None:
                    await self._take_meta(progress, sink, message.payload)
            elif parsed.index is not None and parsed.index < most_chunks:
                await self._take_chunk(progress, sink, parsed.index, message.payload)
            meta = collector.meta
            if meta is None:
                continue
            if collector.complete:
                try:
                    return await asyncio.to_thread(sink.finish, meta, progress.meta_payload)
                except ArtifactError as exc:
                    raise FetchFailed(exc.reason, exc.detail) from exc
            if (
                progress.end_on_corrupt
                and progress.corrupt
                and progress.seen.issuperset(range(len(meta.chunks)))
            ):
                corrupt = describe_indexes(progress.corrupt)
                raise FetchFailed(
                    Reason.CHUNK_CORRUPT, f"chunks {corrupt} of {ref.sha256[:12]} fail their sha256"
                )

    async def _take_meta(self, progress: _Progress, sink: ChunkSink[Any], payload: bytes) -> None:
        collector = progress.collector
        try:
            await asyncio.to_thread(collector.add_meta, payload)
        except RejectedError as exc:
            if progress.end_on_corrupt:
                raise FetchFailed(
                    exc.reason, f"meta of {collector.sha256[:12]}: {exc.detail}"
                ) from exc
            progress.problem = exc
            return
        progress.meta_payload = payload
        progress.seen |= await asyncio.to_thread(sink.resume, collector)
        held, progress.early, progress.early_bytes = progress.early, {}, 0
        for index, candidates in sorted(held.items()):
            for data in candidates:
                await self._check(progress, sink, index, data)

    async def _take_chunk(
        self, progress: _Progress, sink: ChunkSink[Any], index: int, data: bytes
    ) -> None:
        progress.seen.add(index)
        if progress.collector.meta is not None:
            await self._check(progress, sink, index, data)
            return
        # Before the meta: each candidate is kept apart (two sources may differ), so one
        # bad chunk never costs a good one; bounded by twice the artifact plus one chunk.
        size = progress.collector.size
        if progress.early_bytes + len(data) <= 2 * size + MAX_CHUNK_BYTES:
            progress.early.setdefault(index, []).append(data)
            progress.early_bytes += len(data)

    @staticmethod
    async def _check(progress: _Progress, sink: ChunkSink[Any], index: int, data: bytes) -> None:
        collector = progress.collector
        meta = collector.meta
        if meta is None or index >= len(meta.chunks) or collector.has(index):
            return

        def check_and_keep() -> None:
            accepted = collector.add_chunk(index, data)
            if accepted:
                sink.keep(accepted)

        try:
            await asyncio.to_thread(check_and_keep)
        except RejectedError as exc:
            progress.corrupt.add(index)
            progress.problem = exc
            return
        progress.corrupt.discard(index)


def describe_indexes(indexes: set[int]) -> str:
    """A short list of chunk indexes for a message."""
    shown = sorted(indexes)[:8]
    more = len(indexes) - len(shown)
    return ", ".join(map(str, shown)) + (f" and {more} more" if more else "")
