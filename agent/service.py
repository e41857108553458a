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

Storage is allowed to fail. A damaged file (state, outbox, a kept chunk, a stored model)
is moved aside or deleted and reported in a ``storage_damaged`` event; the device then
rebuilds from the retained topics and its model store. A full or read-only data folder
puts the device in ``degraded`` with the reason in its retained state (the one channel
that needs no disk) while inference goes on; a storage task retries every few seconds
and the device heals by itself (``storage_recovered``). Bytes fetched for an artifact
(meta, chunks, the joined file) that do not match are dropped and fetched again later,
never a verdict: they are unsigned, and anyone able to write them could otherwise roll a
rollout back. :meth:`Agent.request_stop` (SIGTERM, SIGINT through
:meth:`Agent.run_until_signalled`) commits the open telemetry window, sends what it can
for a moment, and says ``offline``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol, TypeVar

from agent.artifacts import ArtifactKind, ArtifactStore
from agent.bundle import Bundle
from agent.health import SoakStats, judge
from agent.lifecycle import IN_FLIGHT, Stage, Step, advance
from agent.outbox import Outbox, is_contention
from agent.runtime import Feed, InferenceResult, ModelSlot, read_golden
from agent.store import AgentStore, DamagedFileError, PersistedState, set_aside
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
    Mode,
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
from schemas.artifact import MAX_CHUNK_BYTES, MAX_CHUNKS, ChunkCollector
from schemas.device import MAX_REASON_CHARS
from schemas.errors import bound_text
from schemas.topics import DeviceChannel, TopicKind

__all__ = ["Agent", "AgentConfig", "InputSource"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")


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
    stop_flush_s: float = 3.0
    """How long a requested stop waits for the outbox to reach the broker."""


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


def _indexes(indexes: set[int]) -> str:
    shown = sorted(indexes)
    more = f" and {len(shown) - 8} more" if len(shown) > 8 else ""
    return ", ".join(str(i) for i in shown[:8]) + more


class _Refetch(Exception):  # noqa: N818 (not an error of the agent: a cue to fetch again)
    """Fetched bytes that do not match (a bad meta, corrupt chunks, a joined file of the
    wrong digest): dropped, and fetched again after a backoff. Never a verdict: the meta
    and chunks are unsigned, and whoever can write them must not decide a rollout."""

    def __init__(self, reason: Reason, detail: str) -> None:
        detail = bound_text(detail, 500)
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class _Stopped(Exception):  # noqa: N818 (the end of a requested stop, not an error)
    """Raised inside the task group once a requested stop has committed and sent."""


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
        data = config.data_dir
        # None of these touches the disk before it is used (the folder may be read-only).
        self._artifacts = ArtifactStore(data / "artifacts")
        self._store: AgentStore | None = None
        self._outbox = Outbox(
            data / "outbox.sqlite",
            max_items=config.outbox_max_items,
            max_events=config.outbox_max_events,
        )
        self._trouble: dict[str, str] = {}
        """Storage that fails now (state, outbox, artifacts) -> why; makes the device
        degraded, with the reason in its state, until a write there works again."""
        self._trouble_since: dict[str, float] = {}
        self._damage: list[str] = []
        """Damaged files found and set aside, told in events once the outbox takes them."""
        self._stop = asyncio.Event()
        self._window_lock = asyncio.Lock()
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

    @property
    def storage_trouble(self) -> dict[str, str]:
        """What storage fails now, and why (empty when it all works)."""
        return dict(self._trouble)

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until cancelled or stopped (:meth:`request_stop`). A full, read-only or
        damaged data folder does not stop it (see the module's docstring).

        Raises:
            Exception: an error of the agent itself ends it by raising (so that its
                session leaves the Last Will), never as a clean exit.
        """
        try:
            await asyncio.to_thread(self._open_stores)
            await self._restore()
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._supervise("inference", self._inference_loop))
                    tg.create_task(self._supervise("telemetry", self._telemetry_loop))
                    tg.create_task(self._supervise("update", self._update_loop))
                    tg.create_task(self._supervise("storage", self._storage_loop))
                    tg.create_task(self._supervise("link", self._link_loop))
                    tg.create_task(self._stopper())
            except* _Stopped:
                log.info("%s: stopped", self.device_id)
        finally:
            # Cancelled or stopped: what was counted since the last window is kept.
            with contextlib.suppress(sqlite3.Error, OSError):
                await self._commit_window()
            await asyncio.to_thread(self._close_stores)

    def request_stop(self) -> None:
        """Stop cleanly: commit the open telemetry window, send the outbox for up to
        ``stop_flush_s``, publish ``offline`` and return from :meth:`run`. Callable from
        a signal handler on the loop."""
        self._stop.set()

    async def run_until_signalled(self) -> None:
        """:meth:`run`, with SIGTERM and SIGINT asking for a clean stop: the entry point
        of a device's process (one agent per process: the handlers are the loop's)."""
        loop = asyncio.get_running_loop()
        stops = (signal.SIGTERM, signal.SIGINT)
        for sig in stops:
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.run()
        finally:
            for sig in stops:
                loop.remove_signal_handler(sig)

    async def _stopper(self) -> None:
        await self._stop.wait()
        log.info("%s: stopping", self.device_id)
        with contextlib.suppress(sqlite3.Error, OSError):
            await self._commit_window()
        self._outbox_ready.set()
        # Give the flush a moment to deliver what is queued; what it cannot send stays
        # in the outbox for the next start.
        with contextlib.suppress(TimeoutError, sqlite3.Error, OSError):
            async with asyncio.timeout(self._config.stop_flush_s):
                while self._session is not None and self._session.connected:
                    if not await asyncio.to_thread(len, self._outbox):
                        break
                    await asyncio.sleep(0.05)
        raise _Stopped

    def _open_stores(self) -> None:
        self._store = self._store_thread.submit(
            AgentStore, self._config.data_dir / "state.json"
        ).result()

    def _close_stores(self) -> None:
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
        """Rebuild from the local store: trust, manifest, and the model being served. A
        damaged state file is set aside; the retained trust and manifest and the model
        store then bring the device back (the manifest's seq and target come with the
        retained manifest, the model from the store, checked against its sha256)."""
        assert self._store is not None
        loop = asyncio.get_running_loop()
        try:
            state = await loop.run_in_executor(self._store_thread, self._store.load)
        except DamagedFileError as exc:
            state = PersistedState()
            self._written = None  # so that the next write replaces the damaged file
            await self._damaged(
                exc,
                "lost: the trust, applied manifest seq, active release, known-good and "
                "failed releases and last health report it held; rebuilding them from the "
                "retained trust and manifest and the model store",
                set_aside_file=True,
            )
        except OSError as exc:
            state = PersistedState()
            await self._storage_failed("state", exc)
        else:
            self._written = state
        self._persisted = state
        now = self._clock()
        if state.trust is not None:
            try:
                self._trusted.update_trust(state.trust, now=now)
            except RejectedError as exc:
                log.warning("%s: stored trust no longer valid: %s", self.device_id, exc)
        if state.active is not None:
            path = await self._stored_file(state.active.artifact, ArtifactKind.MODEL)
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
        # Open the outbox now, so that damage it finds is told at once.
        with contextlib.suppress(sqlite3.Error, OSError):
            await self._outbox_do(partial(len, self._outbox))
        await self._tell_damage()

    async def _stored_file(self, ref: ArtifactRef, kind: ArtifactKind) -> Path | None:
        """The verified file in the store, or None; a damaged one is deleted and told."""
        try:
            return await asyncio.to_thread(self._artifacts.verified, ref, kind)
        except DamagedFileError as exc:
            await self._damaged(exc, "fetched again", set_aside_file=False)
        except OSError as exc:
            log.error("%s: %s store unreadable: %s", self.device_id, kind, exc)
        return None

    async def _damaged(self, exc: DamagedFileError, lost: str, *, set_aside_file: bool) -> None:
        """Tell of a damaged file (moving it aside first when asked): logged now, and an
        event as soon as the outbox takes it."""
        note = f"{exc.path} was damaged ({exc.why})"
        if set_aside_file:
            try:
                aside = await asyncio.to_thread(set_aside, exc.path)
            except OSError as move:
                note += f", not moved aside ({move.strerror})"
            else:
                note += f", moved to {aside.name}"
        note += f"; {lost}"
        log.error("%s: %s", self.device_id, note)
        self._damage.append(bound_text(note, 2000))
        await self._tell_damage()

    async def _tell_damage(self) -> None:
        """Queue an event for each damaged file found (by the agent or the outbox)."""
        with contextlib.suppress(sqlite3.Error, OSError):  # told with the next one
            self._damage += await asyncio.to_thread(self._outbox.take_damage)
        while self._damage:
            note = self._damage.pop(0)
            if not await self._emit(EventKind.STORAGE_DAMAGED, None, note, None):
                self._damage.insert(0, note)  # the outbox fails too: told once it works
                return

    # -- storage trouble ---------------------------------------------------------------

    async def _storage_failed(self, part: str, exc: BaseException) -> None:
        """``part`` of storage failed: the device is degraded, with the reason in its
        retained state, until a write there works again (:meth:`_storage_ok`)."""
        why = bound_text(f"{part}: {exc}", 200)
        first = part not in self._trouble
        self._trouble[part] = why
        if first:
            self._trouble_since[part] = time.monotonic()
            log.error("%s: storage failing, %s", self.device_id, why)
            self._publish_state_soon()

    async def _storage_ok(self, part: str) -> None:
        why = self._trouble.pop(part, None)
        if why is None:
            return
        lasted = time.monotonic() - self._trouble_since.pop(part, time.monotonic())
        log.warning("%s: storage works again (%s, for %.0f s)", self.device_id, why, lasted)
        self._publish_state_soon()
        await self._emit(
            EventKind.STORAGE_RECOVERED, None, f"{why} (for {lasted:.0f} s); works again", None
        )

    async def _outbox_do(self, call: Callable[[], _T]) -> _T:
        """One outbox call in a thread, its success or failure told to the storage
        bookkeeping (a locked database is another writer, not a storage failure).

        Raises:
            sqlite3.Error, OSError: the call failed.
        """
        try:
            result = await asyncio.to_thread(call)
        except sqlite3.Error as exc:
            if not is_contention(exc):
                await self._storage_failed("outbox", exc)
            raise
        except OSError as exc:
            await self._storage_failed("outbox", exc)
            raise
        await self._storage_ok("outbox")
        return result

    async def _storage_loop(self) -> None:
        """Retry failing storage every few seconds, so the device heals by itself once
        space or write access is back, whether or not anything else writes meanwhile."""
        while True:
            await asyncio.sleep(self._config.state_interval_s)
            if "state" in self._trouble:
                async with self._store_lock:
                    self._written = None  # write again, even if nothing changed
                await self._write()
            if "outbox" in self._trouble:
                with contextlib.suppress(sqlite3.Error, OSError):
                    await self._outbox_do(self._outbox.probe)
            if "artifacts" in self._trouble:
                try:
                    await asyncio.to_thread(self._artifacts.probe)
                except OSError as exc:
                    await self._storage_failed("artifacts", exc)
                else:
                    await self._storage_ok("artifacts")
                    self._target_changed.set()  # an update waiting for space goes on now
            await self._tell_damage()

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
                await self._storage_failed("state", exc)
                return
            self._written = state
        await self._storage_ok("state")

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
        while True:
            await asyncio.sleep(self._config.telemetry_window_s)
            try:
                await self._commit_window()
            except (sqlite3.Error, OSError) as exc:
                log.warning("%s: telemetry held for the next window: %s", self.device_id, exc)
                continue
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

    async def _commit_window(self) -> None:
        """Close the open window and append it to the outbox (merged with one the
        outbox could not take before). One at a time: a stop may commit while the
        telemetry task does.

        Raises:
            sqlite3.Error, OSError: the outbox failed; the summary is held for the next.
        """
        async with self._window_lock:
            summary = self._window.close(self._clock())
            held, self._held_summary = self._held_summary, None
            if held is not None:
                summary = merge_summaries(held, summary)
            if summary.count == 0:
                return
            self._held_summary = summary  # until the outbox has it: nothing is lost
            topic = topics.device(self.device_id, DeviceChannel.TELEMETRY)
            append = asyncio.ensure_future(
                self._outbox_do(partial(self._outbox.append_summary, topic, summary))
            )
            try:
                await asyncio.shield(append)
            except asyncio.CancelledError:
                # The thread goes on regardless: learn whether the row was stored, or
                # the summary would be appended twice (held, then committed again).
                with contextlib.suppress(Exception):
                    await append
                if append.done() and not append.cancelled() and append.exception() is None:
                    self._held_summary = None
                raise
            self._held_summary = None
            self._outbox_ready.set()

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
            detail = bound_text(f"{exc}; retrying", 1000)
            self._last_rejection = Rejection(
                reason=Reason.FETCH_TIMEOUT.value, detail=detail, at=self._clock()
            )
            await self._emit(
                EventKind.ARTIFACT_REJECTED, Reason.FETCH_TIMEOUT.value, detail, target
            )
            return True
        except _Refetch as exc:
            # Bytes that do not match are dropped and fetched again: not a verdict.
            self._step(Step.FAILED)
            detail = bound_text(f"{exc.detail}; dropped, fetching again", 1000)
            self._last_rejection = Rejection(
                reason=exc.reason.value, detail=detail, at=self._clock()
            )
            await self._emit(EventKind.ARTIFACT_RETRY, exc.reason.value, detail, target)
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
        self._last_rejection = Rejection(
            reason=reason.value, detail=bound_text(detail, 1000), at=self._clock()
        )
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
            _Refetch: a bad meta, corrupt chunks, or a joined file of the wrong digest.
            TimeoutError: the artifact did not arrive within the fetch timeout.
            OSError: the store cannot be written (a full or read-only disk).
        """
        path = await self._stored_file(ref, kind)
        if path is not None:
            return path
        # Room for every chunk of the largest artifact and its meta: a flood of junk on
        # the artifact's topics beyond that is dropped (what is retained comes again on
        # the next attempt), so it cannot grow the agent's memory without bound.
        queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=MAX_CHUNKS + 16)
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
        """Checked chunks to disk as they come, resuming from those kept before (each
        checked again against the meta: the disk may have changed them); the whole file
        once none is missing. Hashing runs in a thread.

        A corrupt chunk is dropped and the rest collected: once every chunk was seen and
        some are still missing, the attempt ends (:class:`_Refetch`) so that a later one
        fetches them again; so does a meta that does not describe ``ref``.

        Raises:
            _Refetch: see above; or the joined file does not hash right.
            OSError: the store cannot be written.
        """
        collector = ChunkCollector(ref.sha256, ref.size)
        # Chunks that come before the meta wait here, bounded like the artifact itself
        # (the collector's own holding would refuse the whole fetch past its bound).
        early: dict[int, bytes] = {}
        early_bytes = 0
        # No meta has more chunks than this (its smallest chunk size is 1 KiB): a chunk
        # published beyond is junk, ignored rather than let it spoil the fetch.
        most_chunks = min(-(-ref.size // 1024), MAX_CHUNKS)
        seen: set[int] = set()
        """Indexes whose chunk came (good or not), or that were kept good before."""
        corrupt: set[int] = set()

        async def offer(index: int, data: bytes) -> None:
            meta = collector.meta
            if meta is not None and index >= len(meta.chunks):
                return  # junk past the artifact's end: not a chunk of it
            try:
                accepted = await asyncio.to_thread(collector.add_chunk, index, data)
            except RejectedError:
                corrupt.add(index)
                return
            corrupt.discard(index)
            await self._keep(ref.sha256, accepted)

        while True:
            message = await queue.get()
            parsed = topics.parse(message.topic)
            if parsed.kind is TopicKind.ARTIFACT_META:
                try:
                    await asyncio.to_thread(collector.add_meta, message.payload)
                except RejectedError as exc:
                    raise _Refetch(exc.reason, f"meta of {ref.sha256[:12]}: {exc.detail}") from exc
                seen |= await self._recheck_kept(collector)
                held, early = early, {}
                for index, data in sorted(held.items()):
                    await offer(index, data)
            elif parsed.index is not None and parsed.index < most_chunks:
                seen.add(parsed.index)
                if collector.meta is not None:
                    await offer(parsed.index, message.payload)
                else:
                    # The latest publish wins, as it does in the broker's retained store.
                    size = early_bytes - len(early.get(parsed.index, b"")) + len(message.payload)
                    if size <= ref.size + MAX_CHUNK_BYTES:
                        early[parsed.index] = message.payload
                        early_bytes = size
            meta = collector.meta
            if meta is None:
                continue
            if collector.complete:
                try:
                    path = await asyncio.to_thread(self._artifacts.assemble, meta, kind)
                except ArtifactError as exc:
                    raise _Refetch(exc.reason, exc.detail) from exc
                except OSError as exc:
                    await self._storage_failed("artifacts", exc)
                    raise
                await self._storage_ok("artifacts")
                return path
            if corrupt and seen.issuperset(range(len(meta.chunks))):
                raise _Refetch(
                    Reason.CHUNK_CORRUPT,
                    f"chunks {_indexes(corrupt)} of {ref.sha256[:12]} fail their sha256",
                )

    async def _keep(self, sha256: str, chunks: list[tuple[int, bytes]]) -> None:
        if not chunks:
            return
        try:
            await asyncio.to_thread(self._artifacts.keep_chunks, sha256, chunks)
        except OSError as exc:
            await self._storage_failed("artifacts", exc)
            raise
        await self._storage_ok("artifacts")

    async def _recheck_kept(self, collector: ChunkCollector) -> set[int]:
        """Check the chunks kept by an earlier fetch against the meta just accepted, and
        hand the good ones to ``collector`` (returns their indexes); one that changed on
        disk is deleted (and told), so it is fetched again in this very attempt."""
        meta = collector.meta
        assert meta is not None

        def recheck() -> tuple[set[int], set[int]]:
            good: set[int] = set()
            bad: set[int] = set()
            for index in sorted(self._artifacts.stored_chunks(meta.sha256)):
                data = self._artifacts.kept_chunk(meta.sha256, index)
                if data is None:
                    continue
                try:
                    collector.add_chunk(index, data)
                except RejectedError:
                    bad.add(index)
                    self._artifacts.drop_chunk(meta.sha256, index)
                else:
                    good.add(index)
            return good, bad

        good, bad = await asyncio.to_thread(recheck)
        if bad:
            folder = self._artifacts.path(meta.sha256, ArtifactKind.MODEL).parent.parent
            exc = DamagedFileError(
                folder / "partial" / meta.sha256,
                f"kept chunks {_indexes(bad)} fail their sha256 (changed on disk)",
            )
            await self._damaged(exc, "deleted, fetched again", set_aside_file=False)
        return good

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
                with contextlib.suppress(asyncio.QueueFull):
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
    ) -> bool:
        """Queue an event; False when the outbox could not store it. Events the outbox
        had to drop (its event cap) or could not store (a disk or database error,
        logged) are counted in the next one stored."""
        at = self._clock()
        lost, self._events_lost = self._events_lost, 0  # taken: a concurrent _emit sees 0

        def build(dropped: int) -> bytes:
            return encode(
                Event(
                    event_id=uuid.uuid4().hex,
                    device_id=self.device_id,
                    kind=kind,
                    reason=None if reason is None else bound_text(reason, 64),
                    detail=bound_text(detail, 2000),
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
            await self._outbox_do(partial(self._outbox.append_event, topic, build))
        except (sqlite3.Error, OSError) as exc:
            self._events_lost += lost + 1
            log.error("%s: %s event not stored (%s): %s", self.device_id, kind.value, exc, detail)
            return False
        except BaseException:
            self._events_lost += lost  # not told: the next event tells them
            raise
        self._outbox_ready.set()
        return True

    async def _flush_loop(self, session: Session) -> None:
        """Send the outbox in order; delete only what the broker acknowledged, and mark
        the rest sent (the client may still deliver it: it must not be merged)."""
        limit = self._config.flush_batch
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while session.connected:
                try:
                    items = await self._outbox_do(partial(self._outbox.peek, limit))
                except (sqlite3.Error, OSError) as exc:
                    # Storage trouble (in the state) or another writer: try again later.
                    log.info("%s: outbox not readable, retrying: %s", self.device_id, exc)
                    await asyncio.sleep(self._config.retry_s)
                    continue
                if not items:
                    break
                results = await asyncio.gather(
                    *(session.publish(i.topic, i.payload, qos=1) for i in items),
                    return_exceptions=True,
                )
                acked = [i.id for i, r in zip(items, results, strict=True) if r is None]
                unacked = [i.id for i, r in zip(items, results, strict=True) if r is not None]
                try:
                    await self._outbox_do(partial(self._outbox.settle, acked, unacked))
                except (sqlite3.Error, OSError) as exc:
                    # Acked rows stay and go again: duplicates, which consumers drop.
                    log.info("%s: outbox not settled, retrying: %s", self.device_id, exc)
                    await asyncio.sleep(self._config.retry_s)
                    continue
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
        await self._publish_retained(DeviceChannel.STATE, encode(self.state()))

    def state(self) -> DeviceState:
        """The device's state as published (retained) on every change."""
        active = self._active
        target = self._desired.release
        trouble = "; ".join(self._trouble[k] for k in sorted(self._trouble))
        return DeviceState(
            device_id=self.device_id,
            hw_class=self.bundle.hw_class,
            mode=Mode.DEGRADED if trouble else self._stage.mode,
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
            degraded_reason=bound_text(trouble, MAX_REASON_CHARS) if trouble else None,
        )

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
