"""The agent: one device's side of edgefleet, as an async service.

Theory of operation. The agent keeps serving: inference runs from the model it has
whether or not the broker is reachable. Everything from the cloud arrives as
retained messages and goes through :class:`schemas.TrustedState` before it can
change anything: the TrustDoc, then the class manifest, whose target release is
handed to the update worker (``agent.lifecycle`` has its table). Telemetry windows
and events go through the durable outbox and leave it only on PUBACK. On every
(re)connect the agent re-asserts its retained topics: presence, state, health.

Nothing but cancellation stops inference: every support task (telemetry, updates, the
link) runs under a supervisor that logs what killed it and restarts it after a backoff;
an update that fails by an error of the agent itself is a failed update, retried later.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from agent.artifacts import ArtifactKind, ArtifactStore
from agent.bundle import Bundle
from agent.health import SoakStats, judge
from agent.lifecycle import IN_FLIGHT, Stage, Step, advance
from agent.outbox import Outbox
from agent.runtime import Feed, InferenceResult, ModelSlot, read_golden
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
    TelemetrySummary,
    TrustedState,
    Verdict,
    encode,
    merge_summaries,
    topics,
)
from schemas.artifact import ChunkCollector
from schemas.topics import DeviceChannel, TopicKind

__all__ = ["Agent", "AgentConfig", "InputSource"]

log = logging.getLogger(__name__)


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
    outbox_max_events: int = 1000
    flush_batch: int = 100
    reconnect_s: float = 1.0
    retry_s: float = 10.0
    """First wait before a failed support task restarts or a fetch that timed out is
    retried; it doubles on every consecutive failure, up to ``retry_max_s``."""
    retry_max_s: float = 600.0


@dataclass(frozen=True)
class _Target:
    release: Release | None
    rollout_id: str | None
    seq: int

    @property
    def work(self) -> tuple[str | None, str | None]:
        """What the target asks for; a re-signed manifest (new seq) asks the same."""
        sha = None if self.release is None else self.release.artifact.sha256
        return sha, self.rollout_id

    @property
    def failed_key(self) -> str:
        """How a failure of this target is remembered: for the rollout, or for a
        stable target for this manifest seq only (a later manifest gets another try)."""
        assert self.release is not None
        scope = self.rollout_id if self.rollout_id is not None else f"seq{self.seq}"
        return f"{scope}:{self.release.artifact.sha256}"


@dataclass
class _Soak:
    slot: ModelSlot
    stats: SoakStats
    previous: ModelSlot | None
    """The model served before the swap, put back if the soak does not end healthy."""
    done: asyncio.Event = field(default_factory=asyncio.Event)


def _digest(payload: bytes) -> bytes:
    return hashlib.sha256(payload).digest()


def _only_transport(exc: BaseException) -> bool:
    """Whether ``exc`` (or every leaf of an exception group) is a lost connection."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_transport(e) for e in exc.exceptions)
    return isinstance(exc, TransportError)


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
        # Opened by run(), in a thread: they touch the disk.
        self._artifacts: ArtifactStore
        self._store: AgentStore | None = None
        self._outbox: Outbox
        self._outbox_open = False
        self._store_thread = ThreadPoolExecutor(1, thread_name_prefix=f"{self.device_id}-store")
        """Store writes run here, one at a time and in order, even when the coroutine
        that asked for one was cancelled meanwhile (TinyDB is not thread-safe)."""
        self._store_lock = asyncio.Lock()
        self._persisted = PersistedState()
        self._written: PersistedState | None = None
        self._stage = Stage.IDLE
        self._active: ModelSlot | None = None
        self._slots: dict[str, ModelSlot] = {}
        self._desired = _Target(None, None, 0)
        self._target_changed = asyncio.Event()
        self._pending_manifest: bytes | None = None
        """The last manifest received and rejected: verified again after a trust change."""
        self._rejected_manifest: bytes | None = None
        self._rejected_trust: bytes | None = None
        """Digests of the last rejected payloads: an identical redelivery stays quiet."""
        self._soak: _Soak | None = None
        self._window = TelemetryWindow(self.device_id, clock())
        self._session: Session | None = None
        self._outbox_ready = asyncio.Event()
        self._state_changed = asyncio.Event()
        self._fetches: dict[str, asyncio.Queue[Message]] = {}
        self._last_rejection: Rejection | None = None
        self._held_summary: TelemetrySummary | None = None
        """A window the outbox could not take; merged into the next one."""
        self._coarsened_reported = 0
        self._events_lost = 0
        """Events the outbox could not store, told in the next one stored."""
        self.inferences_total = 0
        self.inference_errors = 0
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
            await asyncio.to_thread(self._open_stores)
            await self._restore()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._supervise("inference", self._inference_loop))
                tg.create_task(self._supervise("telemetry", self._telemetry_loop))
                tg.create_task(self._supervise("update", self._update_loop))
                tg.create_task(self._supervise("link", self._link_loop))
        finally:
            await asyncio.to_thread(self._close_stores)

    def _open_stores(self) -> None:
        data = self._config.data_dir
        self._artifacts = ArtifactStore(data / "artifacts")
        self._outbox = Outbox(
            data / "outbox.sqlite",
            max_items=self._config.outbox_max_items,
            max_events=self._config.outbox_max_events,
        )
        self._outbox_open = True
        self._store = self._store_thread.submit(AgentStore, data / "state.json").result()

    def _close_stores(self) -> None:
        if self._outbox_open:
            self._outbox.close()
        store = self._store
        if store is not None:
            self._store_thread.submit(store.close).result()
        self._store_thread.shutdown(wait=True)

    async def _supervise(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run ``loop`` for ever: an error is logged and the loop restarted after a
        backoff, so no support task can take inference down. Cancellation goes through."""
        backoff = self._config.retry_s
        while True:
            started = time.monotonic()
            try:
                await loop()
            except Exception:  # the point: log anything, and restart
                log.exception(
                    "%s: %s task failed; restarting in %.1f s", self.device_id, name, backoff
                )
            else:
                log.error("%s: %s task ended; restarting in %.1f s", self.device_id, name, backoff)
            if time.monotonic() - started > self._config.retry_max_s:
                backoff = self._config.retry_s  # it had been running fine for a while
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._config.retry_max_s)

    async def _restore(self) -> None:
        """Rebuild from the local store: trust, manifest, and the model being served."""
        assert self._store is not None
        loop = asyncio.get_running_loop()
        state = await loop.run_in_executor(self._store_thread, self._store.load)
        self._persisted = self._written = state
        now = self._clock()
        if state.trust is not None:
            try:
                self._trusted.update_trust(state.trust, now=now)
            except RejectedError as exc:
                log.warning("%s: stored trust no longer valid: %s", self.device_id, exc)
        if state.active is not None:
            path = await asyncio.to_thread(
                self._artifacts.verified, state.active.artifact, ArtifactKind.MODEL
            )
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

    def _remember(self, **changes: object) -> None:
        """Change the persisted state in memory; :meth:`_write` makes it durable."""
        self._persisted = self._persisted.model_copy(update=changes)

    async def _write(self) -> None:
        """Write the newest state. Writers queue on a lock and each writes whatever is
        newest when its turn comes, so the file never ends older than memory. A failed
        write (disk full) is logged: memory stays right and the next write catches up."""
        assert self._store is not None
        store = self._store
        loop = asyncio.get_running_loop()
        async with self._store_lock:
            state = self._persisted
            if state is self._written:
                return  # a writer before us already wrote it
            try:
                await loop.run_in_executor(self._store_thread, store.save, state)
            except OSError as exc:
                log.error("%s: state not saved (kept in memory): %s", self.device_id, exc)
                return
            self._written = state

    async def _save(self, **changes: object) -> None:
        self._remember(**changes)
        await self._write()

    # -- inference ---------------------------------------------------------------------

    async def _inference_loop(self) -> None:
        interval = 1.0 / self._config.inference_hz
        next_at = time.monotonic()
        while True:
            slot = self._active
            if slot is not None:
                result: InferenceResult | None = None
                try:
                    feed = self._source()  # on the loop: sources need not be thread-safe
                    result = await asyncio.to_thread(slot.run, feed)
                except Exception as exc:  # noqa: BLE001 (a camera or model failure: an inference error)
                    log.debug("%s: inference error: %s", self.device_id, exc)
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
        if result is None:
            self.inference_errors += 1
        soak = self._soak
        if soak is not None and soak.slot is slot and not soak.done.is_set():
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
            held, self._held_summary = self._held_summary, None
            if held is not None:
                summary = merge_summaries(held, summary)
            if summary.count == 0:
                continue
            self._held_summary = summary  # until the outbox has it: nothing is lost
            await asyncio.to_thread(self._outbox.append_summary, topic, summary)
            self._held_summary = None
            self._outbox_ready.set()
            coarsened = self._outbox.coarsened
            if coarsened > self._coarsened_reported:
                merges = coarsened - self._coarsened_reported
                self._coarsened_reported = coarsened
                await self._emit(
                    EventKind.TELEMETRY_COARSENED,
                    None,
                    f"outbox full: {merges} merges of queued telemetry windows "
                    "(counts kept, time resolution lower)",
                    None,
                )

    # -- updates -----------------------------------------------------------------------

    def _set_target(self, manifest: Manifest) -> None:
        """Take the manifest's target for this device. A re-signed manifest (same release
        and rollout, new seq) only updates the bookkeeping: it never supersedes work in
        flight, but it does re-arm a target the device rests without (a stable target
        that failed is retried under a later seq)."""
        picked = manifest.target_for(self.device_id)
        old, new = self._desired, _Target(picked.release, picked.rollout_id, manifest.seq)
        self._desired = new
        promoted = (
            self._stage in IN_FLIGHT
            and old.rollout_id is not None
            and new.rollout_id is None
            and new.work[0] == old.work[0]
        )
        if promoted:
            # The rollout completed while this device still works on its candidate, now
            # the stable release: finish that work rather than start it over.
            return
        if new.work != old.work or (self._stage not in IN_FLIGHT and not self._serves(new)):
            self._target_changed.set()

    def _serves(self, target: _Target) -> bool:
        active = self._active
        return target.release is None or (
            active is not None
            and active.release.artifact.sha256 == target.release.artifact.sha256
            and self._stage is Stage.SERVING
        )

    async def _update_loop(self) -> None:
        retry_in: float | None = None
        while True:
            if retry_in is None:
                await self._target_changed.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(retry_in):
                        await self._target_changed.wait()
            self._target_changed.clear()
            if await self._update(self._desired):
                retry_in = (
                    self._config.retry_s
                    if retry_in is None
                    else min(retry_in * 2, self._config.retry_max_s)
                )
            else:
                retry_in = None

    async def _update(self, target: _Target) -> bool:
        """Work towards ``target`` until done or superseded; True to retry it later."""
        work = asyncio.create_task(self._apply(target))
        changed = asyncio.create_task(self._target_changed.wait())
        try:
            await asyncio.wait({work, changed}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done() and self._stage not in IN_FLIGHT:
                # Past its verdict: let it store, announce and report it (the
                # coordinator waits for that report); the new target comes next.
                await asyncio.wait({work})
        finally:
            changed.cancel()
            soak = self._soak
            if not work.done():
                work.cancel()
                await asyncio.wait({work})
                if self._stage in IN_FLIGHT:
                    # The work no longer matters: serve what was served before it.
                    if soak is not None and self._active is soak.slot:
                        self._active = soak.previous
                    self._step(Step.SUPERSEDED)
            self._soak = None
        if work.cancelled():
            return False
        exc = work.exception()
        if exc is None:
            return work.result()
        log.error("%s: update to %s failed", self.device_id, target.release, exc_info=exc)
        if self._stage in IN_FLIGHT:
            if soak is not None and self._active is soak.slot:
                self._active = soak.previous
            self._step(Step.FAILED)
        return True

    def _step(self, step: Step) -> None:
        self._stage = advance(self._stage, step, has_model=self._active is not None)
        self._publish_state_soon()

    async def _apply(self, target: _Target) -> bool:
        """Fetch, load, swap, soak and report ``target``; True when it should be
        retried later (a fetch that timed out)."""
        release = target.release
        if release is None:
            return False
        sha = release.artifact.sha256
        if self._active is not None and self._active.release.artifact.sha256 == sha:
            if self._stage is Stage.DEGRADED:
                self._step(Step.SERVED)
            return False
        if target.failed_key in self._persisted.failed:
            return False
        cached = self._slots.get(sha)
        if cached is not None and sha in self._persisted.known_good:
            self._active = cached
            self._step(Step.SERVED)
            await self._save(active=release)
            return False
        self._step(Step.TARGET)
        try:
            path = await self._fetch(release.artifact, ArtifactKind.MODEL)
            golden = (
                None
                if release.golden is None
                else await self._fetch(release.golden, ArtifactKind.GOLDEN)
            )
            self._step(Step.FETCHED)
            # The self-test runs the release's golden set, or else one real input (the
            # source is called on the loop, like everywhere else).
            check = golden if golden is not None else self._source()
            slot = await asyncio.to_thread(self._load, release, path, check)
        except TimeoutError as exc:
            # Transient (the broker or the artifact is not there yet): not a verdict.
            self._step(Step.FAILED)
            detail = f"{exc}; retrying"
            self._last_rejection = Rejection(
                reason=Reason.FETCH_TIMEOUT.value, detail=detail, at=self._clock()
            )
            await self._emit(
                EventKind.ARTIFACT_REJECTED, Reason.FETCH_TIMEOUT.value, detail, target
            )
            return True
        except RejectedError as exc:
            self._step(Step.FAILED)
            await self._fail(target, exc.reason, exc.detail, EventKind.ARTIFACT_REJECTED)
            return False
        previous = self._active
        # Keep two slots: the one to fall back to, and the one being tried.
        self._slots = {} if previous is None else {previous.release.artifact.sha256: previous}
        self._slots[sha] = slot
        soak = _Soak(slot=slot, stats=SoakStats(started=time.monotonic()), previous=previous)
        self._soak = soak
        self._active = slot
        self._step(Step.LOADED)
        verdict, reasons = await self._soak_slot(soak)
        # The report first: it is what the coordinator waits for, the event only tells.
        if verdict is Verdict.HEALTHY:
            self._step(Step.HEALTHY)
            await self._save(active=release, known_good=(*self._persisted.known_good[-7:], sha))
            await self._report(target, verdict, reasons, soak.stats)
            await self._emit(
                EventKind.UPDATE_APPLIED, None, f"serving {release.release_id}", target
            )
        else:
            self._active = previous
            self._step(Step.UNHEALTHY)
            await self._save(failed=(*self._persisted.failed[-31:], target.failed_key))
            await self._report(target, verdict, reasons, soak.stats)
            await self._emit(
                EventKind.ROLLBACK,
                reasons[0].split(":")[0],
                f"{release.release_id} unhealthy ({', '.join(reasons)}); back to "
                f"{previous.release.release_id if previous else 'nothing'}",
                target,
            )
        return False

    @staticmethod
    def _load(release: Release, path: Path, check: Path | Feed) -> ModelSlot:
        """Load the model beside the one serving and self-test it with ``check``: the
        file of the release's golden set, or else one real input."""
        slot = ModelSlot(release, path)
        slot.self_test(read_golden(check) if isinstance(check, Path) else check)
        return slot

    async def _soak_slot(self, soak: _Soak) -> tuple[Verdict, tuple[str, ...]]:
        budget = soak.slot.release.health
        # A model too slow to reach min_inferences must still be judged, so the soak
        # has a deadline; judge() then reports too few inferences.
        deadline = budget.soak_seconds * 3 + budget.min_inferences / self._config.inference_hz * 3
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(deadline + 5.0):
                await soak.done.wait()
        soak.done.set()  # judged: later inferences no longer count
        return judge(soak.stats, budget)

    async def _fail(self, target: _Target, reason: Reason, detail: str, kind: EventKind) -> None:
        await self._save(failed=(*self._persisted.failed[-31:], target.failed_key))
        self._last_rejection = Rejection(reason=reason.value, detail=detail, at=self._clock())
        await self._report(target, Verdict.UNHEALTHY, (reason.value,), None)
        await self._emit(kind, reason.value, detail, target)

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

    async def _fetch(self, ref: ArtifactRef, kind: ArtifactKind) -> Path:
        """The verified file for ``ref``, fetched over MQTT when missing.

        Raises:
            ArtifactError, MalformedPayloadError: a bad meta, chunk or whole file.
            TimeoutError: the artifact did not arrive within the fetch timeout.
        """
        path = await asyncio.to_thread(self._artifacts.verified, ref, kind)
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
                return await self._collect(ref, kind, queue)
        except TimeoutError as exc:
            msg = (
                f"{kind} artifact {ref.sha256[:12]} not fetched within "
                f"{self._config.fetch_timeout_s:g} s"
            )
            raise TimeoutError(msg) from exc
        finally:
            del self._fetches[ref.sha256]
            if subscribed is not None and subscribed is self._session:
                with contextlib.suppress(TransportError):
                    await subscribed.unsubscribe(topics.artifact_chunks(ref.sha256))

    async def _collect(
        self, ref: ArtifactRef, kind: ArtifactKind, queue: asyncio.Queue[Message]
    ) -> Path:
        """Checked chunks to disk as they come, resuming from those kept before; the
        whole file once none is missing. Hashing runs in a thread."""
        have = await asyncio.to_thread(self._artifacts.stored_chunks, ref.sha256)
        collector = ChunkCollector(ref.sha256, ref.size, have=have)
        while True:
            message = await queue.get()
            parsed = topics.parse(message.topic)
            if parsed.kind is TopicKind.ARTIFACT_META:
                accepted = await asyncio.to_thread(collector.add_meta, message.payload)
            elif parsed.index is not None:
                accepted = await asyncio.to_thread(
                    collector.add_chunk, parsed.index, message.payload
                )
            else:
                continue
            if accepted:
                await asyncio.to_thread(self._artifacts.keep_chunks, ref.sha256, accepted)
            if collector.complete and collector.meta is not None:
                return await asyncio.to_thread(self._artifacts.assemble, collector.meta, kind)

    # -- MQTT link ---------------------------------------------------------------------

    async def _link_loop(self) -> None:
        """Keep a session to the broker; paho reconnects within one, this loop
        covers a broker that was unreachable when the agent started."""
        will = Will(
            topic=topics.device(self.device_id, DeviceChannel.PRESENCE),
            payload=OFFLINE,
            retain=True,
        )
        backoff = self._config.reconnect_s
        while True:
            started = time.monotonic()
            try:
                async with Session(self._endpoint, client_id=self.device_id, will=will) as session:
                    await self._linked(session)
            except Exception as exc:  # whatever ends a session, the next one starts
                if time.monotonic() - started > self._config.retry_max_s:
                    backoff = self._config.reconnect_s  # it had been linked fine for a while
                if _only_transport(exc):
                    log.info("%s: broker unreachable (%s); serving on", self.device_id, exc)
                    backoff = self._config.reconnect_s
                else:
                    log.exception(
                        "%s: link failed; reconnecting in %.1f s", self.device_id, backoff
                    )
                    backoff = min(backoff * 2, self._config.retry_max_s)
            finally:
                self._session = None
            await asyncio.sleep(backoff)

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
                await self._handle(message)
            except Exception:  # one bad message must not end the link, nor the agent
                log.exception("%s: message on %s not handled", self.device_id, message.topic)

    async def _handle(self, message: Message) -> None:
        try:
            parsed = topics.parse(message.topic)
        except RejectedError as exc:
            log.warning("%s: ignoring %s", self.device_id, exc)
            return
        if parsed.kind is TopicKind.TRUST:
            await self._on_trust(message.payload)
        elif parsed.kind is TopicKind.CLASS_MANIFEST:
            await self._on_manifest(message.payload)
        elif parsed.kind in (TopicKind.ARTIFACT_META, TopicKind.ARTIFACT_CHUNK):
            queue = self._fetches.get(parsed.name or "")
            if queue is not None:
                queue.put_nowait(message)

    async def _on_trust(self, payload: bytes) -> None:
        if payload == self._persisted.trust or _digest(payload) == self._rejected_trust:
            return  # a retained redelivery of what was already judged
        try:
            doc = self._trusted.update_trust(payload, now=self._clock())
        except RejectedError as exc:
            self._rejected_trust = _digest(payload)
            await self._reject(EventKind.TRUST_REJECTED, exc)
            return
        log.info("%s: trust version %d", self.device_id, doc.version)
        self._rejected_trust = None
        self._remember(trust=payload)
        self._publish_state_soon()
        try:
            await self._write()
        finally:
            # Keys changed: the last manifest rejected may verify now, whatever its reason.
            if self._pending_manifest is not None:
                pending, self._pending_manifest = self._pending_manifest, None
                self._rejected_manifest = None
                await self._on_manifest(pending)

    async def _on_manifest(self, payload: bytes) -> None:
        if payload == self._persisted.manifest or _digest(payload) == self._rejected_manifest:
            return  # a retained redelivery of what was already judged
        try:
            manifest = self._trusted.verify_manifest(
                payload,
                hw_class=self.bundle.hw_class,
                applied_seq=self._persisted.applied_seq,
                now=self._clock(),
            )
        except RejectedError as exc:
            self._pending_manifest = payload
            self._rejected_manifest = _digest(payload)
            await self._reject(EventKind.MANIFEST_REJECTED, exc)
            return
        self._pending_manifest = self._rejected_manifest = None
        # Memory first, then the disk: a failed write must not leave the target unset
        # while the redelivered bytes already count as applied.
        self._remember(manifest=payload, applied_seq=manifest.seq)
        self._set_target(manifest)
        self._publish_state_soon()
        await self._write()

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
        """Queue an event. Events the outbox had to drop (its event cap) or could not
        store (a disk or database error, logged) are counted in the next one stored."""
        at = self._clock()
        lost, self._events_lost = self._events_lost, 0  # taken: a concurrent _emit sees 0

        def build(dropped: int) -> bytes:
            return encode(
                Event(
                    event_id=uuid.uuid4().hex,
                    device_id=self.device_id,
                    kind=kind,
                    reason=reason,
                    detail=detail[:2000],
                    dropped_before=dropped + lost,
                    manifest_seq=None if target is None else target.seq,
                    release=(
                        None
                        if target is None or target.release is None
                        else target.release.release_id
                    ),
                    at=at,
                )
            )

        topic = topics.device(self.device_id, DeviceChannel.EVENTS)
        try:
            await asyncio.to_thread(self._outbox.append_event, topic, build)
        except (sqlite3.Error, OSError) as exc:
            self._events_lost += lost + 1
            log.error("%s: %s event not stored (%s): %s", self.device_id, kind.value, exc, detail)
            return
        except BaseException:
            self._events_lost += lost  # not told: the next event tells them
            raise
        self._outbox_ready.set()

    async def _flush_loop(self, session: Session) -> None:
        """Send the outbox in order; delete only what the broker acknowledged, and mark
        the rest sent (the client may still deliver it: it must not be merged)."""
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
                unacked = [i.id for i, r in zip(items, results, strict=True) if r is not None]
                await asyncio.to_thread(self._outbox.settle, acked, unacked)
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
