"""Fetching an artifact into the device's artifact store, with the shared fetcher.

:class:`broker.fetch.ArtifactFetcher` collects and checks; :class:`StoreSink` is where
the agent keeps what it collects: checked chunks go to disk as they come, chunks kept by
an earlier attempt are checked again against the meta before they count (the disk may
have changed them: those are deleted and told), and the whole file is joined and hashed
in a thread once none is missing. Bytes that do not match (a bad meta, corrupt chunks, a
joined file of the wrong digest) end the attempt with :class:`broker.fetch.FetchFailed`:
they are unsigned, so they are fetched again, never judged.

A device has one source (the broker's retained copy), so an attempt ends as soon as
every chunk was seen and some are corrupt. One that waits for the link, or whose link
drops, goes on trying within its timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from agent.artifacts import ArtifactKind, ArtifactStore
from agent.events import EngineEvent, StorageFailed, StorageOk, StoragePart
from agent.store import DamagedFileError
from broker.fetch import ArtifactFetcher, describe_indexes
from broker.transport import Message, Transport, TransportError
from schemas import ArtifactMeta, ArtifactRef, RejectedError, topics
from schemas.artifact import ChunkCollector

__all__ = ["Fetcher", "StoreSink"]

log = logging.getLogger(__name__)

Damaged = Callable[[DamagedFileError, str], Awaitable[None]]
"""Tells of a damaged file and what became of it."""


class StoreSink:
    """One artifact's chunks kept in the :class:`ArtifactStore` (blocking; the fetcher
    calls it in a thread). :attr:`damaged` names kept chunks found changed on disk."""

    def __init__(self, store: ArtifactStore, sha256: str, kind: ArtifactKind) -> None:
        self._store = store
        self._sha256 = sha256
        self._kind = kind
        self.damaged: set[int] = set()

    def resume(self, collector: ChunkCollector) -> set[int]:
        good: set[int] = set()
        for index in sorted(self._store.stored_chunks(self._sha256)):
            data = self._store.kept_chunk(self._sha256, index)
            if data is None:
                continue
            try:
                collector.add_chunk(index, data)
            except RejectedError:
                self.damaged.add(index)
                self._store.drop_chunk(self._sha256, index)
            else:
                good.add(index)
        return good

    def keep(self, chunks: list[tuple[int, bytes]]) -> None:
        self._store.keep_chunks(self._sha256, chunks)

    def finish(self, meta: ArtifactMeta, meta_payload: bytes) -> Path:  # noqa: ARG002 (the store keeps no meta)
        return self._store.assemble(meta, self._kind)


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
        self._fetcher = ArtifactFetcher()

    def offer(self, message: Message) -> None:
        """A message on an artifact's topics: to the fetch that wants it, if one runs."""
        self._fetcher.offer(message)

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
            FetchFailed: a bad meta, corrupt chunks, or a joined file of the wrong digest.
            TimeoutError: the artifact did not arrive within the fetch timeout.
            OSError: the store cannot be written (a full or read-only disk).
        """
        path = await self.stored(ref, kind)
        if path is not None:
            return path
        sink = StoreSink(self.store, ref.sha256, kind)
        deadline = time.monotonic() + self._timeout_s
        try:
            path = await self._attempts(ref, sink, deadline)
        except TimeoutError as exc:
            msg = f"{kind} artifact {ref.sha256[:12]} not fetched within {self._timeout_s:g} s"
            raise TimeoutError(msg) from exc
        except OSError as exc:
            self._feed(StorageFailed(StoragePart.ARTIFACTS, str(exc), self._clock()))
            raise
        finally:
            await self._tell_damaged(ref, sink)
        self._feed(StorageOk(StoragePart.ARTIFACTS, self._clock()))
        return path

    async def _attempts(self, ref: ArtifactRef, sink: StoreSink, deadline: float) -> Path:
        """Fetch over the link, waiting for one and trying again on a lost one, until
        ``deadline``.

        Raises:
            TimeoutError: the deadline passed.
        """
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            transport = self._transport()
            if transport is not None:
                try:
                    return await self._fetcher.fetch(
                        transport,
                        ref,
                        sink,
                        filters=(topics.artifact_chunks(ref.sha256),),
                        timeout=left,
                        end_on_corrupt=True,
                    )
                except TransportError as exc:
                    log.info("%s: fetch interrupted, retrying: %s", self._device_id, exc)
            await asyncio.sleep(min(self._resubscribe_s, max(left, 0.0)))

    async def _tell_damaged(self, ref: ArtifactRef, sink: StoreSink) -> None:
        if not sink.damaged:
            return
        folder = self.store.path(ref.sha256, ArtifactKind.MODEL).parent.parent
        exc = DamagedFileError(
            folder / "partial" / ref.sha256,
            f"kept chunks {describe_indexes(sink.damaged)} fail their sha256 (changed on disk)",
        )
        sink.damaged = set()
        await self._damaged(exc, "deleted, fetched again")
