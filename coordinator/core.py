"""What the coordinator's services share: its state, its stores, and the steps every one
of them takes (a store write, an audit entry, a publish, a status).

The engines (``manifests``, ``specs``, ``custody``, ``clock``, ``rollout``) decide; the
services (``link``, ``ingest``, ``intake``, ``keeper``, ``signer``, ``ticker``) carry
out their decisions through a :class:`Core`. Only the link sets :attr:`Core.transport`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from pydantic import ValidationError

from broker.transport import Transport, TransportError
from coordinator.artifacts import ArtifactStore
from coordinator.clock import Settling
from coordinator.config import CoordinatorConfig
from coordinator.custody import BrokerArtifacts, named_refs
from coordinator.fleet import FleetView
from coordinator.metrics import Counters
from coordinator.rollout import RolloutRecord
from coordinator.specs import Claim
from coordinator.store import ClassRecord, CoordinatorStore, Refusal
from schemas import (
    ArtifactMeta,
    ArtifactRef,
    Cause,
    LaneStatus,
    Phase,
    RejectedError,
    RolloutStatus,
    TrustedState,
    WaveCounts,
    encode,
    topics,
)
from schemas.errors import MAX_DETAIL_CHARS, bound_text
from schemas.rollout import MAX_SILENT_SHOWN

__all__ = ["Core", "describe"]

log = logging.getLogger(__name__)

_R = TypeVar("_R")


def describe(exc: BaseException) -> str:
    """An exception in one bounded line (its text may quote hostile input)."""
    return bound_text(f"{type(exc).__name__}: {exc}", MAX_DETAIL_CHARS)


class Core:
    """The coordinator's state and stores, shared by its services (one event loop)."""

    def __init__(self, config: CoordinatorConfig, clock: Callable[[], float]) -> None:
        """Open the store (blocking).

        Raises:
            StoreDamagedError: the store file is damaged.
        """
        self.config = config
        self.limits = config.limits
        self.clock = clock
        """Wall time, for records, manifests and statuses."""
        self.monotonic: Callable[[], float] = time.monotonic
        """For settling and orphans' grace: never jumps."""
        self.trusted = TrustedState(config.root_keys)
        self.trust_bytes = config.trust
        """The TrustDoc published: the configured one, or a newer root-signed one found
        retained on the broker."""
        self.counters = Counters()
        """What the services count (ingest, refusals, the stores' write times)."""
        self.store = CoordinatorStore(config.data_dir / "coordinator.json")
        self.artifacts = ArtifactStore(config.data_dir / "artifacts")
        self.fleet = FleetView(
            seen_kept=config.limits.reports_remembered,
            device_reason_chars=config.limits.device_reason_chars,
            unhealthy_quoted=config.limits.unhealthy_quoted,
        )
        self.settling = Settling(nonce=secrets.token_hex(8), resend_s=config.fence_s)
        """When the fleet view is complete: the link sends the fence, the ingest sees it
        come back, the ticker asks."""
        self.classes: dict[str, ClassRecord] = {}
        self.rollouts: dict[str, RolloutRecord] = {}
        self.refusals: dict[str, Refusal] = {}
        self.claims: dict[str, Claim] = {}
        """Rollout id -> what a spec being validated reserves."""
        self.fetching: set[str] = set()
        """Artifacts being fetched: their uploads are still needed."""
        self.named: set[str] = set()
        """Artifacts some rollout named: cleared from the broker once none does."""
        self.copies: dict[str, tuple[ArtifactMeta, bytes]] = {}
        """Kept metas (decoded, and as published) of the artifacts kept."""
        self.on_broker = BrokerArtifacts()
        self.transport: Transport | None = None
        self.tg: asyncio.TaskGroup | None = None
        self.ready = asyncio.Event()
        """Set once this connection's cache was read and re-asserted; specs wait for it."""
        self.changed = asyncio.Event()
        """Something a tick should look at now, not at its next period."""
        self.rollout_lock = asyncio.Lock()
        """Every read-modify-write of a rollout record, the record re-read inside it."""
        self.sync_lock = asyncio.Lock()
        """One manifest sync at a time: each takes its seq from what the last one stored."""
        self.store_lock = asyncio.Lock()
        """The store rewrites its whole file on every write: one writing thread at a time."""
        self.artifact_lock = asyncio.Lock()
        """One prune of the kept artifacts at a time (a fetch in flight is ``busy``, so
        a prune keeps it)."""
        # What the broker's cache holds now, as last seen (retained or live).
        self.retained_trust: bytes | None = None
        self.retained_manifests: dict[str, bytes] = {}
        self.retained_specs: dict[str, str] = {}
        """Rollout id -> sha256 of its retained spec: digests, since an operator account
        may retain any number of specs of up to 1 MiB each."""
        self.retained_statuses: dict[str, bytes] = {}

    # -- what is named ----------------------------------------------------------------

    def named_refs(self) -> dict[str, ArtifactRef]:
        """The artifacts (models and golden sets) of the stables and live candidates."""
        return named_refs(self.classes.values(), self.rollouts.values())

    def busy(self) -> set[str]:
        """Artifacts being fetched or validated: their uploads are still needed."""
        shas = set(self.fetching)
        for claim in self.claims.values():
            shas |= claim.shas
        return shas

    def referenced(self) -> set[str]:
        """Artifacts a manifest names or will name: stables, live candidates, and the
        candidates being validated."""
        return set(self.named_refs()) | self.busy()

    # -- tasks ------------------------------------------------------------------------

    def spawn(self, what: str, work: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
        """Run ``work`` beside the caller in the link's task group, guarded; None (and
        ``work`` dropped) when no link is up."""
        if self.tg is None:
            work.close()
            return None
        return self.tg.create_task(self.guarded(what, work))

    async def guarded(self, what: str, work: Coroutine[Any, Any, None]) -> None:
        """Run a handler; its failure is logged and its message dropped, the task group
        (the service) goes on."""
        try:
            await work
        except Exception as exc:  # no message may end the service
            log.error("coordinator: %s failed, dropped: %s", what, describe(exc))
            log.debug("coordinator: %s failed", what, exc_info=True)

    # -- the store ----------------------------------------------------------------------

    async def write(self, fn: Callable[[_R], None], record: _R) -> None:
        async with self.store_lock:
            started = time.perf_counter()
            work = asyncio.ensure_future(asyncio.to_thread(fn, record))
            try:
                await asyncio.shield(work)
            except asyncio.CancelledError:
                # A stop waits for the write in its thread: the lock is not released
                # (nor the store closed) under a write still running.
                await asyncio.wait([work])
                raise
            self.counters.store_writes.observe(time.perf_counter() - started)

    async def save(self, record: RolloutRecord, what: str, detail: str) -> None:
        await self.write(self.store.put_rollout, record)
        self.rollouts[record.id] = record
        await self.audit(what, record.id, detail)

    async def put_class(self, record: ClassRecord) -> None:
        await self.write(self.store.put_class, record)
        self.classes[record.name] = record

    async def audit(self, what: str, rollout_id: str, detail: str) -> None:
        entry = {
            "at": self.clock(),
            "event": what,
            "rollout": rollout_id,
            "detail": bound_text(detail, self.limits.reason_chars),
        }
        await self.write(self.store.audit, entry)

    def bound(self, text: str) -> str:
        """A reason built from input, bounded where it is built."""
        return bound_text(text, self.limits.reason_chars)

    # -- the broker -----------------------------------------------------------------------

    async def publish(self, topic: str, payload: bytes, *, retain: bool = True) -> None:
        transport = self.transport
        if transport is None:
            return
        try:
            await transport.publish(topic, payload, retain=retain)
        except TransportError as exc:
            log.warning("coordinator: %s not published (re-asserted on reconnect): %s", topic, exc)

    def adopt_trust(self, payload: bytes) -> bool:
        """Take ``payload`` as the TrustDoc to publish if the root role signed it and it
        is newer than ours (it was rotated since the configuration was written)."""
        candidate = TrustedState(self.config.root_keys)
        now = self.clock()
        try:
            candidate.update_trust(self.trust_bytes, now=now)
            doc = candidate.update_trust(payload, now=now)
        except RejectedError:
            return False
        log.warning(
            "coordinator: the broker holds a newer TrustDoc (version %d): using it", doc.version
        )
        self.trusted = candidate
        self.trust_bytes = payload
        return True

    async def publish_status(self, rollout_id: str) -> None:
        """Publish the record as it is now: read and handed to the session in one step,
        so statuses leave in the order of the records they show."""
        payload = self.status_payload(rollout_id)
        if payload is not None:
            await self.publish(topics.rollout_status(rollout_id), payload)

    async def publish_manifest(self, name: str) -> None:
        """Publish the newest manifest of ``name``: read and handed to the transport in
        one step (nothing awaits in between), so no caller queues an older seq after a
        newer."""
        record = self.classes.get(name)
        if record is not None and record.manifest is not None:
            await self.publish(topics.class_manifest(name), record.manifest)

    def status_payload(self, rollout_id: str) -> bytes | None:
        """The status of a rollout record, or of a refused spec; None when there is
        none, or it cannot be built (logged: a record is skipped, never a crash loop)."""
        try:
            status = self._status(rollout_id)
        except ValidationError as exc:
            log.error("coordinator: status of %s not published: %s", rollout_id, describe(exc))
            return None
        return None if status is None else encode(status)

    def _lane_status(self, record: RolloutRecord, name: str) -> LaneStatus:
        lane = record.lanes[name]
        silent = self.fleet.silent(record, name, MAX_SILENT_SHOWN) if lane.counts.silent else []
        return LaneStatus(
            phase=lane.phase,
            wave=lane.wave,
            cutoff_bp=lane.cutoff_bp,
            counts=lane.counts,
            silent=tuple(silent),
            reason=None if lane.reason is None else self.bound(lane.reason),
            cause=lane.cause,
            waiting=lane.waiting,
        )

    def _status(self, rollout_id: str) -> RolloutStatus | None:
        record = self.rollouts.get(rollout_id)
        if record is not None:
            return RolloutStatus(
                id=record.id,
                generation=record.generation,
                phase=record.phase,
                wave=record.wave,
                waves_percent=tuple(w.percent or 0.0 for w in record.waves)
                if all(w.percent is not None for w in record.waves)
                else (),
                waves=record.waves,
                lanes={name: self._lane_status(record, name) for name in record.lanes},
                counts=record.counts,
                classes=record.classes,
                release=record.release_id if record.candidates else None,
                releases={name: r.release_id for name, r in record.candidates.items()},
                # Bounded again here: a record stored before reasons were bounded.
                reason=None if record.reason is None else self.bound(record.reason),
                cause=record.cause,
                updated_at=record.updated_at,
            )
        refusal = self.refusals.get(rollout_id)
        if refusal is None:
            return None
        return RolloutStatus(
            id=refusal.id,
            generation=0,
            phase=Phase.REJECTED,
            wave=0,
            waves_percent=(),
            counts=WaveCounts(),
            classes=(),
            reason=self.bound(refusal.reason),
            cause=Cause.SPEC_REFUSED,
            updated_at=refusal.at,
        )
