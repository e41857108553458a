"""Artifact custody carried out: the broker's ``artifacts/`` made what the kept copies
say, and what no manifest names cleared (decisions: :mod:`coordinator.custody`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

from broker.fetch import FetchFailed
from broker.transport import Message, TransportError
from coordinator import custody
from coordinator.core import Core, describe
from coordinator.custody import Orphan
from coordinator.fetching import Fetcher
from schemas import RejectedError, topics
from schemas.topics import TopicKind

__all__ = ["Arrivals", "Keeper"]

log = logging.getLogger(__name__)

_PUBLISHED_KINDS = frozenset({TopicKind.ARTIFACT_META, TopicKind.ARTIFACT_CHUNK})


def _digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


class Arrivals:
    """Specs taken and not yet recorded (their artifacts claimed, or refused). An
    artifact no record names may be the one such a spec is about to claim: a rollout
    admitted again after its coordinator lost its store, whose candidate no record
    names until then. So no kept copy is pruned while any spec arrives."""

    def __init__(self) -> None:
        self._count = 0
        self._none = asyncio.Event()
        self._none.set()

    def add(self) -> None:
        self._count += 1
        self._none.clear()

    def done(self) -> None:
        self._count -= 1
        if self._count == 0:
            self._none.set()

    async def none(self) -> None:
        """Return once no spec arrives."""
        await self._none.wait()


class Keeper:
    def __init__(self, core: Core, fetcher: Fetcher) -> None:
        self._core = core
        self._fetcher = fetcher
        self.arrivals = Arrivals()
        self._repairing: set[str] = set()
        self._repair_again: set[str] = set()
        """Artifacts tampered with again while being re-asserted."""

    async def note(self, message: Message, kind: TopicKind, sha256: str, index: int | None) -> None:
        """Follow what the broker retains under ``artifacts/`` and ``staging/``, and
        repair a named artifact someone tampered with. A chunk is hashed in a thread:
        chunks are large, and the caller awaits it to keep messages in order."""
        core = self._core
        payload = message.payload
        digest = None
        if index is not None and payload:
            digest = await asyncio.to_thread(_digest, payload)
        staged = kind not in _PUBLISHED_KINDS
        core.on_broker.note(sha256, index, payload, digest, staged=staged, now=core.monotonic())
        self._fetcher.offer(message)
        if (
            not staged
            and core.ready.is_set()
            and custody.contradicts(
                core.copies,
                set(core.named_refs()),
                sha256,
                index=index,
                payload=payload,
                digest=digest,
            )
        ):
            if sha256 in self._repairing:
                self._repair_again.add(sha256)
            else:
                core.spawn(f"artifact {sha256[:12]} re-assert", self.repair(sha256))

    async def repair(self, sha256: str) -> None:
        """Make the broker's ``artifacts/{sha256}/`` what the kept copy says; again when
        it was tampered with meanwhile."""
        self._repairing.add(sha256)
        try:
            while True:
                self._repair_again.discard(sha256)
                await self._repair_once(sha256)
                if sha256 not in self._repair_again:
                    return
        finally:
            self._repairing.discard(sha256)

    async def _repair_once(self, sha256: str) -> None:
        core = self._core
        copy = core.copies.get(sha256)
        if copy is None:
            copy = await asyncio.to_thread(core.artifacts.meta, sha256)
            if copy is None:
                log.warning("coordinator: no copy of artifact %s to re-assert", sha256[:12])
                return
            core.copies[sha256] = copy
        meta, meta_payload = copy
        plan = custody.repair_plan(meta, meta_payload, core.on_broker.held(sha256, staged=False))
        if plan is None:
            return
        log.info(
            "coordinator: re-asserting artifact %s (%d of %d chunks)",
            sha256[:12],
            len(plan.wrong),
            len(meta.chunks),
        )
        for batch in plan.batches(core.limits.publish_window):
            datas = [await asyncio.to_thread(core.artifacts.chunk, meta, i) for i in batch]
            if any(d is None for d in datas):
                log.error("coordinator: the kept copy of %s is damaged", sha256[:12])
                core.copies.pop(sha256, None)
                return
            await asyncio.gather(
                *(
                    core.publish(topics.artifact_chunk(sha256, i), data)
                    for i, data in zip(batch, datas, strict=True)
                    if data is not None
                )
            )
        for index in plan.extra:
            await core.publish(topics.artifact_chunk(sha256, index), b"")
        await core.publish(topics.artifact_meta(sha256), meta_payload)

    async def reassert(self) -> None:
        """Every named artifact the broker lost or holds otherwise, from the kept
        copies; then whatever no manifest names any longer is cleared. A named artifact
        without a copy (a lost data folder) is fetched from the broker and kept first."""
        core = self._core
        for sha256, ref in sorted(core.named_refs().items()):
            if self._fetcher.fetching(sha256):
                continue
            if await asyncio.to_thread(core.artifacts.meta, sha256) is None:
                try:
                    await self._fetcher.get(ref)
                except (RejectedError, FetchFailed, TimeoutError, TransportError) as exc:
                    log.warning(
                        "coordinator: no copy of artifact %s, and none to fetch: %s",
                        sha256[:12],
                        describe(exc),
                    )
                    continue
            await self.repair(sha256)
        await self.prune()

    async def prune(self) -> None:
        """Delete the kept copies no manifest names, and clear them from the broker;
        once no spec is arriving (it may be about to claim one of them)."""
        core = self._core
        await self.arrivals.none()
        async with core.artifact_lock:
            keep = core.referenced()
            gone = await asyncio.to_thread(core.artifacts.prune, keep)
        for sha256 in gone:
            log.info("coordinator: artifact %s no longer named by a manifest", sha256[:12])
            core.copies.pop(sha256, None)
            core.named.add(sha256)
        await self.clear_orphans(ended=True)

    def orphans_due(self) -> bool:
        core = self._core
        return core.on_broker.orphans_due(
            core.monotonic(),
            core.config.orphan_grace_s,
            referenced=core.referenced(),
            busy=core.busy(),
        )

    async def clear_orphans(self, *, ended: bool) -> None:
        """Clear from the broker the artifacts no manifest names: at once those some
        ended rollout named (``ended``), and any upload or artifact nobody claimed
        within ``orphan_grace_s`` of its arrival."""
        core = self._core
        orphans = core.on_broker.orphans(
            core.monotonic(),
            core.config.orphan_grace_s,
            referenced=core.referenced(),
            busy=core.busy(),
            ended=core.named if ended else None,
        )
        for orphan in orphans:
            await self._clear(orphan)

    async def publish_checked(self, shas: set[str]) -> None:
        """After admission: the checked bytes under ``artifacts/``, then the staged
        uploads cleared (nothing else reads them)."""
        for sha256 in sorted(shas):
            await self.repair(sha256)
        await self.clear_uploads(shas)

    async def clear_uploads(self, shas: set[str]) -> None:
        for sha256 in sorted(shas - self._core.busy()):
            await self._clear(Orphan(sha256, staged=True))

    async def _clear(self, orphan: Orphan) -> None:
        """An empty retained message on every topic the broker holds for the artifact
        under ``staging/`` or ``artifacts/``."""
        core = self._core
        sha256, staged = orphan.sha256, orphan.staged
        held = core.on_broker.held(sha256, staged=staged)
        if held is None:
            return
        log.info(
            "coordinator: clearing %s %s (%d chunks)",
            "staged upload" if staged else "artifact",
            sha256[:12],
            len(held.chunks),
        )
        chunk_topic = topics.staging_chunk if staged else topics.artifact_chunk
        meta_topic = topics.staging_meta if staged else topics.artifact_meta
        for index in sorted(held.chunks):
            # Checked before each: a spec may name the artifact meanwhile.
            if sha256 in (core.busy() if staged else core.referenced()):
                return
            await core.publish(chunk_topic(sha256, index), b"")
        if held.meta is not None:
            await core.publish(meta_topic(sha256), b"")
