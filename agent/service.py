"""The agent: one device's side of edgefleet, as an async service.

Theory of operation. The agent keeps serving: inference runs from the model it has
whether or not the broker is reachable. Everything from the cloud arrives as
retained messages and goes through :class:`schemas.TrustedState` before it can
change anything: the TrustDoc, then the class manifest, whose target release is
handed to the update worker (``agent.lifecycle`` has its table). Telemetry windows
and events go through the durable outbox and leave it only on PUBACK. On every
(re)connect the agent re-asserts its retained topics: presence, state, health.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from agent.artifacts import ArtifactStore
from agent.bundle import Bundle
from agent.health import SoakStats, judge
from agent.lifecycle import Stage, Step, advance
from agent.outbox import Outbox
from agent.runtime import Feed, InferenceResult, ModelSlot
from agent.store import AgentStore, PersistedState
from agent.telemetry import TelemetryWindow
from broker.session import Endpoint, Message, Session, TransportError, Will
from schemas import (
    OFFLINE,
    ONLINE,
    ArtifactError,
    ArtifactRef,
    DeviceState,
    Event,
    EventKind,
    HealthReport,
    Manifest,
    Reason,
    RejectedError,
    Rejection,
    Release,
    TrustedState,
    Verdict,
    encode,
    topics,
)
from schemas.topics import DeviceChannel, TopicKind

__all__ = ["Agent", "AgentConfig", "InputSource"]

log = logging.getLogger(__name__)

_IN_FLIGHT = (Stage.FETCHING, Stage.LOADING, Stage.SOAKING)
"""Stages a newer target may cut short; after them a verdict is being recorded."""


class InputSource(Protocol):
    """Where the device's inputs come from (a camera, a sensor); one feed per call."""

    def __call__(self) -> Feed: ...


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    data_dir: Path
    inference_hz: float = 20.0
    telemetry_window_s: float = 10.0
    state_interval_s: float = 5.0
    fetch_timeout_s: float = 120.0
    outbox_max_items: int = 5000
    flush_batch: int = 100
    reconnect_s: float = 1.0


@dataclass(frozen=True)
class _Target:
    release: Release | None
    rollout_id: str | None
    seq: int


@dataclass
class _Soak:
    slot: ModelSlot
    stats: SoakStats
    target: _Target
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Agent:
    """Runs until cancelled. ``clock`` is injectable so tests control expiry."""

    def __init__(
        self,
        bundle: Bundle,
        bundle_dir: Path,
        config: AgentConfig,
        source: InputSource,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bundle = bundle
        self.device_id = bundle.device_id
        self._config = config
        self._source = source
        self._clock = clock
        self._endpoint = Endpoint(
            host=bundle.broker_host,
            port=bundle.broker_port,
            ca_file=bundle_dir / bundle.ca_file,
            cert_file=bundle_dir / bundle.cert_file,
            key_file=bundle_dir / bundle.key_file,
        )
        self._trusted = TrustedState(bundle.root_public_keys())
        self._artifacts = ArtifactStore(config.data_dir / "artifacts")
        self._store = AgentStore(config.data_dir / "state.json")
        self._outbox = Outbox(config.data_dir / "outbox.sqlite", max_items=config.outbox_max_items)
        self._persisted = PersistedState()
        self._stage = Stage.IDLE
        self._active: ModelSlot | None = None
        self._slots: dict[str, ModelSlot] = {}
        self._desired = _Target(None, None, 0)
        self._target_changed = asyncio.Event()
        self._pending_manifest: bytes | None = None
        self._soak: _Soak | None = None
        self._window = TelemetryWindow(self.device_id, clock())
        self._session: Session | None = None
        self._outbox_ready = asyncio.Event()
        self._state_changed = asyncio.Event()
        self._fetches: dict[str, asyncio.Queue[Message]] = {}
        self._last_rejection: Rejection | None = None
        self.inferences_total = 0
        self._last_inference_at: float | None = None

    # -- public views, for the CLI and tests -------------------------------------------

    @property
    def stage(self) -> Stage:
        return self._stage

    @property
    def active_release(self) -> Release | None:
        return None if self._active is None else self._active.release

    @property
    def applied_seq(self) -> int:
        return self._persisted.applied_seq

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until cancelled.

        Raises:
            OSError, ValueError: the data folder or bundle is unusable.
        """
        try:
            await self._restore()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._inference_loop())
                tg.create_task(self._telemetry_loop())
                tg.create_task(self._update_loop())
                tg.create_task(self._link_loop())
        finally:
            await asyncio.to_thread(self._close_stores)

    def _close_stores(self) -> None:
        self._outbox.close()
        self._store.close()

    async def _restore(self) -> None:
        """Rebuild from the local store: trust, manifest, and the model being served."""
        state = await asyncio.to_thread(self._store.load)
        self._persisted = state
        now = self._clock()
        if state.trust is not None:
            try:
                self._trusted.update_trust(state.trust, now=now)
            except RejectedError as exc:
                log.warning("%s: stored trust no longer valid: %s", self.device_id, exc)
        if state.active is not None:
            path = await asyncio.to_thread(self._artifacts.verified, state.active.artifact)
            if path is not None:
                try:
                    slot = await asyncio.to_thread(ModelSlot, state.active, path)
                except ArtifactError as exc:
                    log.error("%s: stored model does not load: %s", self.device_id, exc)
                else:
                    self._active = slot
                    self._slots[state.active.artifact.sha256] = slot
                    self._stage = Stage.SERVING
        if state.manifest is not None:
            manifest = self._stored_manifest(state.manifest)
            if manifest is not None:
                self._set_target(manifest)

    def _stored_manifest(self, data: bytes) -> Manifest | None:
        """Re-verify the manifest applied before a restart (its seq is the one below)."""
        try:
            return self._trusted.verify_manifest(
                data,
                hw_class=self.bundle.hw_class,
                applied_seq=self._persisted.applied_seq - 1,
                now=self._clock(),
            )
        except RejectedError as exc:
            log.warning("%s: stored manifest no longer valid: %s", self.device_id, exc)
            return None

    async def _save(self, **changes: object) -> None:
        self._persisted = self._persisted.model_copy(update=changes)
        await asyncio.to_thread(self._store.save, self._persisted)

    # -- inference ---------------------------------------------------------------------

    async def _inference_loop(self) -> None:
        interval = 1.0 / self._config.inference_hz
        next_at = time.monotonic()
        while True:
            slot = self._active
            if slot is not None:
                feed = self._source()
                result: InferenceResult | None
                try:
                    result = await asyncio.to_thread(slot.run, feed)
                except ValueError as exc:
                    log.debug("%s: %s", self.device_id, exc)
                    result = None
                self._record(slot, result)
            next_at += interval
            delay = next_at - time.monotonic()
            if delay < 0:
                next_at = time.monotonic()
                delay = 0
            await asyncio.sleep(delay)

    def _record(self, slot: ModelSlot, result: InferenceResult | None) -> None:
        self.inferences_total += 1
        self._last_inference_at = self._clock()
        self._window.record(slot.release.release_id, result)
        soak = self._soak
        if soak is not None and soak.slot is slot:
            if result is None:
                soak.stats.errors += 1
            else:
                soak.stats.latencies_ms.append(result.latency_ms)
            if soak.stats.ready(slot.release.health, time.monotonic()):
                soak.done.set()

    async def _telemetry_loop(self) -> None:
        topic = topics.device(self.device_id, DeviceChannel.TELEMETRY)
        while True:
            await asyncio.sleep(self._config.telemetry_window_s)
            summary = self._window.close(self._clock())
            if summary.count == 0:
                continue
            await asyncio.to_thread(self._outbox.append_summary, topic, summary)
            self._outbox_ready.set()

    # -- updates -----------------------------------------------------------------------

    def _set_target(self, manifest: Manifest) -> None:
        picked = manifest.target_for(self.device_id)
        self._desired = _Target(picked.release, picked.rollout_id, manifest.seq)
        self._target_changed.set()

    async def _update_loop(self) -> None:
        while True:
            await self._target_changed.wait()
            self._target_changed.clear()
            target = self._desired
            work = asyncio.create_task(self._apply(target))
            changed = asyncio.create_task(self._target_changed.wait())
            try:
                await asyncio.wait({work, changed}, return_when=asyncio.FIRST_COMPLETED)
                if not work.done() and self._stage not in _IN_FLIGHT:
                    # Past its verdict: let it store, announce and report it (the
                    # coordinator waits for that report); the new target comes next.
                    await work
            finally:
                changed.cancel()
                if not work.done():
                    work.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await work
                    self._soak = None
                    if self._stage in _IN_FLIGHT:
                        self._step(Step.SUPERSEDED)
            if work.done() and not work.cancelled() and (exc := work.exception()) is not None:
                raise exc

    def _step(self, step: Step) -> None:
        self._stage = advance(self._stage, step, has_model=self._active is not None)
        self._publish_state_soon()

    async def _apply(self, target: _Target) -> None:
        release = target.release
        if release is None:
            return
        sha = release.artifact.sha256
        if self._active is not None and self._active.release.artifact.sha256 == sha:
            if self._stage is Stage.DEGRADED:
                self._step(Step.SERVED)
            return
        failed_key = f"{target.rollout_id}:{sha}"
        if failed_key in self._persisted.failed:
            return
        cached = self._slots.get(sha)
        if cached is not None and sha in self._persisted.known_good:
            self._active = cached
            self._step(Step.SERVED)
            await self._save(active=release)
            return
        self._step(Step.TARGET)
        try:
            path = await self._fetch(release.artifact)
            self._step(Step.FETCHED)
            slot = await asyncio.to_thread(self._load, release, path)
        except (RejectedError, TimeoutError) as exc:
            reason = exc.reason if isinstance(exc, RejectedError) else Reason.FETCH_TIMEOUT
            detail = exc.detail if isinstance(exc, RejectedError) else "artifact fetch timed out"
            self._step(Step.FAILED)
            await self._fail(target, reason, detail, EventKind.ARTIFACT_REJECTED)
            return
        previous = self._active
        # Keep two slots: the one to fall back to, and the one being tried.
        self._slots = {} if previous is None else {previous.release.artifact.sha256: previous}
        self._slots[sha] = slot
        self._active = slot
        self._step(Step.LOADED)
        verdict, reasons, stats = await self._soak_slot(slot, target)
        if verdict is Verdict.HEALTHY:
            self._step(Step.HEALTHY)
            await self._save(active=release, known_good=(*self._persisted.known_good[-7:], sha))
            await self._emit(
                EventKind.UPDATE_APPLIED, None, f"serving {release.release_id}", target
            )
        else:
            self._active = previous
            self._step(Step.UNHEALTHY)
            await self._save(failed=(*self._persisted.failed[-31:], failed_key))
            await self._emit(
                EventKind.ROLLBACK,
                reasons[0].split(":")[0],
                f"{release.release_id} unhealthy ({', '.join(reasons)}); back to "
                f"{previous.release.release_id if previous else 'nothing'}",
                target,
            )
        await self._report(target, verdict, reasons, stats)

    def _load(self, release: Release, path: Path) -> ModelSlot:
        slot = ModelSlot(release, path)
        slot.self_test(self._source())
        return slot

    async def _soak_slot(
        self, slot: ModelSlot, target: _Target
    ) -> tuple[Verdict, tuple[str, ...], SoakStats]:
        budget = slot.release.health
        soak = _Soak(slot=slot, stats=SoakStats(started=time.monotonic()), target=target)
        self._soak = soak
        # A model too slow to reach min_inferences must still be judged, so the soak
        # has a deadline; judge() then reports too few inferences.
        deadline = budget.soak_seconds * 3 + budget.min_inferences / self._config.inference_hz * 3
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(deadline + 5.0):
                    await soak.done.wait()
        finally:
            self._soak = None
        verdict, reasons = judge(soak.stats, budget)
        return verdict, reasons, soak.stats

    async def _fail(self, target: _Target, reason: Reason, detail: str, kind: EventKind) -> None:
        assert target.release is not None
        sha = target.release.artifact.sha256
        await self._save(failed=(*self._persisted.failed[-31:], f"{target.rollout_id}:{sha}"))
        self._last_rejection = Rejection(reason=reason.value, detail=detail, at=self._clock())
        await self._emit(kind, reason.value, detail, target)
        await self._report(target, Verdict.UNHEALTHY, (reason.value,), None)

    async def _report(
        self,
        target: _Target,
        verdict: Verdict,
        reasons: tuple[str, ...],
        stats: SoakStats | None,
    ) -> None:
        assert target.release is not None
        report = HealthReport(
            report_id=uuid.uuid4().hex,
            device_id=self.device_id,
            rollout_id=target.rollout_id,
            manifest_seq=target.seq,
            release=target.release.release_id,
            verdict=verdict,
            reasons=reasons,
            inferences=0 if stats is None else stats.inferences,
            errors=0 if stats is None else stats.errors,
            p95_latency_ms=None if stats is None else stats.p95_ms(),
            soak_seconds=0.0 if stats is None else time.monotonic() - stats.started,
            at=self._clock(),
        )
        await self._save(last_health=report)
        await self._publish_retained(DeviceChannel.HEALTH, encode(report))

    async def _fetch(self, ref: ArtifactRef) -> Path:
        """The verified model file for ``ref``, fetched over MQTT when missing.

        Raises:
            ArtifactError, MalformedPayloadError: a bad meta, chunk or whole file.
            TimeoutError: the artifact did not arrive within the fetch timeout.
        """
        path = await asyncio.to_thread(self._artifacts.verified, ref)
        if path is not None:
            return path
        queue: asyncio.Queue[Message] = asyncio.Queue()
        self._fetches[ref.sha256] = queue
        subscribed: Session | None = None
        try:
            async with asyncio.timeout(self._config.fetch_timeout_s):
                while subscribed is None:
                    session = self._session
                    if session is not None:
                        try:
                            await session.subscribe(topics.artifact_chunks(ref.sha256))
                            subscribed = session
                            break
                        except TransportError as exc:
                            log.info("%s: subscribe failed, retrying: %s", self.device_id, exc)
                    await asyncio.sleep(self._config.reconnect_s)
                return await self._collect(ref, queue)
        finally:
            del self._fetches[ref.sha256]
            if subscribed is not None and subscribed is self._session:
                with contextlib.suppress(TransportError):
                    await subscribed.unsubscribe(topics.artifact_chunks(ref.sha256))

    async def _collect(self, ref: ArtifactRef, queue: asyncio.Queue[Message]) -> Path:
        meta = None
        early: dict[int, bytes] = {}
        while True:
            message = await queue.get()
            parsed = topics.parse(message.topic)
            if parsed.kind is TopicKind.ARTIFACT_META:
                meta = self._artifacts.accept_meta(ref, message.payload)
                for index, data in early.items():
                    await asyncio.to_thread(self._artifacts.put_chunk, meta, index, data)
                early.clear()
            elif parsed.index is not None:
                if meta is None:
                    # Retained messages of one wildcard come in no set order.
                    if sum(map(len, early.values())) + len(message.payload) > ref.size * 2:
                        raise ArtifactError(Reason.OVERSIZED, "chunks exceed the artifact size")
                    early[parsed.index] = message.payload
                    continue
                await asyncio.to_thread(
                    self._artifacts.put_chunk, meta, parsed.index, message.payload
                )
            if meta is not None and not await asyncio.to_thread(self._artifacts.missing, meta):
                return await asyncio.to_thread(self._artifacts.assemble, meta)

    # -- MQTT link ---------------------------------------------------------------------

    async def _link_loop(self) -> None:
        """Keep a session to the broker; paho reconnects within one, this loop
        covers a broker that was unreachable when the agent started."""
        will = Will(
            topic=topics.device(self.device_id, DeviceChannel.PRESENCE),
            payload=OFFLINE,
            retain=True,
        )
        while True:
            try:
                async with Session(self._endpoint, client_id=self.device_id, will=will) as session:
                    await self._linked(session)
            except TransportError as exc:
                log.info("%s: broker unreachable (%s); serving on", self.device_id, exc)
            finally:
                self._session = None
            await asyncio.sleep(self._config.reconnect_s)

    async def _linked(self, session: Session) -> None:
        await session.subscribe(topics.trust(), topics.class_manifest(self.bundle.hw_class))
        self._session = session
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._reassert_on_connect(session))
                tg.create_task(self._dispatch(session))
                tg.create_task(self._flush_loop(session))
                tg.create_task(self._state_loop())
        finally:
            if session.connected:
                with contextlib.suppress(TransportError):
                    await session.publish(
                        topics.device(self.device_id, DeviceChannel.PRESENCE),
                        OFFLINE,
                        retain=True,
                        timeout=2.0,
                    )

    async def _reassert_on_connect(self, session: Session) -> None:
        async for _ in session.connections():
            try:
                await session.publish(
                    topics.device(self.device_id, DeviceChannel.PRESENCE), ONLINE, retain=True
                )
                await self._publish_state()
                if self._persisted.last_health is not None:
                    await self._publish_retained(
                        DeviceChannel.HEALTH, encode(self._persisted.last_health)
                    )
            except TransportError as exc:
                log.info("%s: re-assert failed: %s", self.device_id, exc)
            self._outbox_ready.set()

    async def _dispatch(self, session: Session) -> None:
        async for message in session.messages():
            try:
                parsed = topics.parse(message.topic)
            except RejectedError as exc:
                log.warning("%s: ignoring %s", self.device_id, exc)
                continue
            if parsed.kind is TopicKind.TRUST:
                await self._on_trust(message.payload)
            elif parsed.kind is TopicKind.CLASS_MANIFEST:
                await self._on_manifest(message.payload)
            elif parsed.kind in (TopicKind.ARTIFACT_META, TopicKind.ARTIFACT_CHUNK):
                queue = self._fetches.get(parsed.name or "")
                if queue is not None:
                    queue.put_nowait(message)

    async def _on_trust(self, payload: bytes) -> None:
        if payload == self._persisted.trust:
            return
        try:
            doc = self._trusted.update_trust(payload, now=self._clock())
        except RejectedError as exc:
            await self._reject(EventKind.TRUST_REJECTED, exc)
            return
        log.info("%s: trust version %d", self.device_id, doc.version)
        await self._save(trust=payload)
        if self._pending_manifest is not None:
            pending, self._pending_manifest = self._pending_manifest, None
            await self._on_manifest(pending)

    async def _on_manifest(self, payload: bytes) -> None:
        if payload == self._persisted.manifest:
            return
        try:
            manifest = self._trusted.verify_manifest(
                payload,
                hw_class=self.bundle.hw_class,
                applied_seq=self._persisted.applied_seq,
                now=self._clock(),
            )
        except RejectedError as exc:
            if exc.reason is Reason.NOT_TRUSTED:
                self._pending_manifest = payload
            await self._reject(EventKind.MANIFEST_REJECTED, exc)
            return
        await self._save(manifest=payload, applied_seq=manifest.seq)
        self._set_target(manifest)
        self._publish_state_soon()

    async def _reject(self, kind: EventKind, exc: RejectedError) -> None:
        log.warning("%s: %s: %s", self.device_id, kind.value, exc)
        self._last_rejection = Rejection(
            reason=exc.reason.value, detail=exc.detail, at=self._clock()
        )
        await self._emit(kind, exc.reason.value, exc.detail, None)
        self._publish_state_soon()

    async def _emit(
        self, kind: EventKind, reason: str | None, detail: str, target: _Target | None
    ) -> None:
        event = Event(
            event_id=uuid.uuid4().hex,
            device_id=self.device_id,
            kind=kind,
            reason=reason,
            detail=detail[:2000],
            manifest_seq=None if target is None else target.seq,
            release=None if target is None or target.release is None else target.release.release_id,
            at=self._clock(),
        )
        topic = topics.device(self.device_id, DeviceChannel.EVENTS)
        await asyncio.to_thread(self._outbox.append, "event", topic, encode(event))
        self._outbox_ready.set()

    async def _flush_loop(self, session: Session) -> None:
        """Send the outbox in order; delete only what the broker acknowledged."""
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while session.connected:
                items = await asyncio.to_thread(self._outbox.peek, self._config.flush_batch)
                if not items:
                    break
                results = await asyncio.gather(
                    *(session.publish(i.topic, i.payload, qos=1) for i in items),
                    return_exceptions=True,
                )
                acked = [i.id for i, r in zip(items, results, strict=True) if r is None]
                await asyncio.to_thread(self._outbox.delete, acked)
                failures = [r for r in results if isinstance(r, BaseException)]
                if failures:
                    log.info(
                        "%s: %d unsent, retrying: %s", self.device_id, len(failures), failures[0]
                    )
                    await asyncio.sleep(self._config.reconnect_s)

    async def _state_loop(self) -> None:
        """Publish state on every change, and periodically for liveness."""
        while True:
            self._state_changed.clear()
            await self._publish_state()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._config.state_interval_s):
                    await self._state_changed.wait()

    def _publish_state_soon(self) -> None:
        self._state_changed.set()

    async def _publish_state(self) -> None:
        active = self._active
        target = self._desired.release
        state = DeviceState(
            device_id=self.device_id,
            hw_class=self.bundle.hw_class,
            mode=self._stage.mode,
            active_release=None if active is None else active.release.release_id,
            active_sha256=None if active is None else active.release.artifact.sha256,
            target_release=None if target is None else target.release_id,
            rollout_id=self._desired.rollout_id,
            applied_seq=self._persisted.applied_seq,
            trust_version=self._trusted.trust_version,
            inferences_total=self.inferences_total,
            last_inference_at=self._last_inference_at,
            last_rejection=self._last_rejection,
            updated_at=self._clock(),
        )
        await self._publish_retained(DeviceChannel.STATE, encode(state))

    async def _publish_retained(self, channel: DeviceChannel, payload: bytes) -> None:
        session = self._session
        if session is None or not session.connected:
            return  # re-asserted on the next connect
        try:
            await session.publish(topics.device(self.device_id, channel), payload, retain=True)
        except TransportError as exc:
            log.info(
                "%s: %s not published (re-asserted on reconnect): %s", self.device_id, channel, exc
            )
