"""The agent: one device's side of edgefleet, as an async service.

Theory of operation. The agent keeps serving: inference runs from the model it has
whether or not the broker is reachable. Everything from the cloud arrives as retained
messages and goes through the pure :class:`agent.intake.Intake` before it can change
anything; a manifest taken gives the device its target, which the pure update engine
(:mod:`agent.engine`, carried out by :mod:`agent.updater`) works towards. Telemetry
windows and events go through the durable outbox (:mod:`agent.journal`) and leave it
only on PUBACK (:mod:`agent.link`, which re-asserts the retained topics on every
connect).

This module only wires the parts and runs them: every support task (telemetry,
updates, storage, the link) runs under a supervisor that logs what killed it and
restarts it after a backoff, so nothing but cancellation stops inference.

Storage is allowed to fail. A damaged file (state, outbox, a kept chunk, a stored model)
is moved aside or deleted and reported in a ``storage_damaged`` event; the device then
rebuilds from the retained topics and its model store. A full or read-only data folder
puts the device in ``degraded`` with the reason in its retained state (the one channel
that needs no disk) while inference goes on; the storage task retries every few seconds
and the device heals by itself (``storage_recovered``). :meth:`Agent.request_stop`
(SIGTERM, SIGINT through :meth:`Agent.run_until_signalled`) commits the open telemetry
window, sends what it can for a moment, and says ``offline``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from agent.artifacts import ArtifactStore
from agent.bundle import Bundle
from agent.engine import UpdateEngine
from agent.events import (
    EngineEvent,
    FailedRelease,
    Restored,
    Stopping,
    StorageFailed,
    StoragePart,
    Targeted,
)
from agent.fetch import Fetcher
from agent.inference import Inference, InputSource, Prediction
from agent.intake import Intake, ManifestTaken, Outcome, Refused, TrustTaken
from agent.inventory import DeviceInventory
from agent.journal import Journal
from agent.lifecycle import Stage
from agent.limits import Limits
from agent.link import STATE_SETTLE_S, Link
from agent.outbox import Outbox
from agent.persistence import StateKeeper
from agent.runtime import Inputs
from agent.serve import InferenceServer, ServeConfig
from agent.store import DamagedFileError
from agent.updater import Updater
from agent.upkeep import Upkeep
from broker.backoff import Retry
from broker.transport import Endpoint, Message
from schemas import (
    DeviceState,
    HealthReport,
    RejectedError,
    Release,
    topics,
)
from schemas.topics import TopicKind

__all__ = ["Agent", "AgentConfig", "InputSource"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    data_dir: Path
    inference_hz: float = 20.0
    telemetry_window_s: float = 10.0
    state_interval_s: float = 5.0
    state_settle_s: float = STATE_SETTLE_S
    """How long a changed state waits for the changes that follow it."""
    fetch_timeout_s: float = 120.0
    outbox_max_items: int = 5000
    outbox_max_events: int = 1000
    flush_batch: int = 100
    resend_s: float = 30.0
    """How long a telemetry summary the broker took waits for the coordinator's ack
    before it is sent again; doubled on every try up to ``resend_max_s``."""
    resend_max_s: float = 600.0
    reconnect_s: float = 1.0
    retry_s: float = 10.0
    """First wait before a failed support task restarts or a failed update is retried;
    it grows on every consecutive failure (with jitter), up to ``retry_max_s``."""
    retry_max_s: float = 600.0
    stop_flush_s: float = 3.0
    """How long a requested stop waits for the outbox to reach the broker."""
    limits: Limits = field(default_factory=Limits)
    serve: ServeConfig | None = None
    """The local inference endpoint (Open Inference Protocol); None: no endpoint."""
    providers: tuple[str, ...] | None = None
    """The execution providers this device tries, in order, instead of its class's (see
    :mod:`agent.providers`); None: the release's."""


class _Stopped(Exception):  # noqa: N818 (the end of a requested stop, not an error)
    """Raised inside the task group once a requested stop has committed and sent."""


class Agent:
    """Runs until cancelled. ``clock`` is injectable so tests control expiry."""

    def __init__(
        self,
        bundle: Bundle,
        bundle_dir: Path,
        config: AgentConfig,
        source: InputSource | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bundle = bundle
        self.device_id = device_id = bundle.device_id
        self._config = config
        self._clock = clock
        data = config.data_dir
        # None of these touches the disk before it is used (the folder may be read-only).
        self._intake = Intake(
            bundle.root_public_keys(), hw_class=bundle.hw_class, device_id=device_id
        )
        self._keeper = StateKeeper(
            data / "state.json", device_id=device_id, feed=self._feed, clock=clock
        )
        outbox = Outbox(
            data / "outbox.sqlite",
            max_items=config.outbox_max_items,
            max_events=config.outbox_max_events,
            resend_s=config.resend_s,
            resend_max_s=config.resend_max_s,
        )
        self._journal = Journal(
            outbox, device_id=device_id, feed=self._feed, clock=clock, limits=config.limits
        )
        self._inference = Inference(
            source,
            device_id=device_id,
            hz=config.inference_hz,
            record=self._journal.record,
            feed=self._feed,
            clock=clock,
            limits=config.limits,
        )
        serve, hw_class = config.serve, bundle.hw_class
        self.server = (
            None if serve is None else InferenceServer(serve, self._inference, hw_class=hw_class)
        )
        self.link = Link(
            Endpoint(
                host=bundle.broker_host,
                port=bundle.broker_port,
                ca_file=bundle_dir / bundle.ca_file,
                cert_file=bundle_dir / bundle.cert_file,
                key_file=bundle_dir / bundle.key_file,
            ),
            device_id=device_id,
            hw_class=bundle.hw_class,
            journal=self._journal,
            dispatch=self.receive,
            state=self.state,
            last_health=lambda: self._engine.memory.last_health,
            reconnect_s=config.reconnect_s,
            retry_s=config.retry_s,
            state_interval_s=config.state_interval_s,
            flush_batch=config.flush_batch,
            state_settle_s=config.state_settle_s,
        )
        self._fetcher = Fetcher(
            ArtifactStore(data / "artifacts"),
            device_id=device_id,
            transport=lambda: self.link.transport,
            damaged=partial(self._journal.damaged, set_aside_file=False),
            feed=self._feed,
            clock=clock,
            timeout_s=config.fetch_timeout_s,
            resubscribe_s=config.reconnect_s,
        )
        self._engine = UpdateEngine(
            device_id,
            inference_hz=config.inference_hz,
            retry=Retry(UpdateEngine.retry_policy(config.retry_s, config.retry_max_s)),
            limits=config.limits,
        )
        self._updater = Updater(
            self._engine,
            fetcher=self._fetcher,
            inference=self._inference,
            keeper=self._keeper,
            journal=self._journal,
            publish=self.link.publish_retained,
            state_changed=self.link.state_changed,
            clock=clock,
            providers=config.providers,
        )
        self._stop = asyncio.Event()
        self._inventory = DeviceInventory(data)
        self.ready = asyncio.Event()
        """Set once :meth:`run` restored what the device serves (systemd's READY)."""
        self._upkeep = Upkeep(
            self._engine,
            keeper=self._keeper,
            journal=self._journal,
            store=self._fetcher.store,
            updater=self._updater,
            clock=clock,
            interval_s=config.state_interval_s,
        )
        self._task: asyncio.Task[None] | None = None

    def _feed(self, event: EngineEvent) -> None:
        self._updater.feed(event)

    # -- public views, for the CLI and tests -------------------------------------------

    @property
    def stage(self) -> Stage:
        return self._engine.stage

    @property
    def active_release(self) -> Release | None:
        return self._engine.active

    @property
    def applied_seq(self) -> int:
        return self._intake.applied_seq

    @property
    def last_health(self) -> HealthReport | None:
        """The last health report made here (re-asserted on every connect)."""
        return self._engine.memory.last_health

    @property
    def failed_releases(self) -> tuple[FailedRelease, ...]:
        """Releases that failed here and are not tried again in their scope."""
        return self._engine.memory.failed

    @property
    def storage_trouble(self) -> dict[str, str]:
        """What storage fails now, and why (empty when it all works)."""
        return self._engine.trouble

    @property
    def inferences_total(self) -> int:
        return self._inference.total

    @property
    def inference_errors(self) -> int:
        return self._inference.errors

    def state(self) -> DeviceState:
        """The device's state as published (retained) on every change."""
        engine = self._engine
        active, desired = engine.active, engine.desired
        return DeviceState(
            device_id=self.device_id,
            hw_class=self.bundle.hw_class,
            mode=engine.mode,
            active_release=None if active is None else active.release_id,
            active_sha256=None if active is None else active.artifact.sha256,
            target_release=None if desired.release is None else desired.release.release_id,
            rollout_id=desired.rollout_id,
            applied_seq=self._intake.applied_seq,
            trust_version=self._intake.trust_version,
            inferences_total=self._inference.total,
            last_inference_at=self._inference.last_at,
            last_rejection=self._updater.last_rejection,
            updated_at=self._clock(),
            degraded_reason=engine.degraded_reason,
            inventory=self._inventory.current(),
        )

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until cancelled or stopped (:meth:`request_stop`). A full, read-only or
        damaged data folder does not stop it (see the module's docstring).

        Raises:
            Exception: an error of the agent itself ends it by raising (so that its
                session leaves the Last Will), never as a clean exit.
        """
        config = self._config
        try:
            await asyncio.to_thread(self._keeper.open)
            await self._restore()
            self.ready.set()
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._supervise("inference", self._inference.run))
                    tg.create_task(
                        self._supervise(
                            "telemetry",
                            partial(self._journal.telemetry_loop, config.telemetry_window_s),
                        )
                    )
                    tg.create_task(self._supervise("update", self._updater.run))
                    tg.create_task(self._supervise("storage", self._upkeep.run))
                    tg.create_task(self._supervise("link", self.link.run))
                    if self.server is not None:
                        tg.create_task(self._supervise("endpoint", self.server.run))
                    tg.create_task(self._stopper())
            except* _Stopped:
                log.info("%s: stopped", self.device_id)
        finally:
            # Cancelled or stopped: what was counted since the last window is kept, and
            # the newest state written (a write still waiting its turn would be lost),
            # with a soak cut short by this stop no longer open: it was no crash.
            with contextlib.suppress(sqlite3.Error, OSError):
                await self._journal.commit_window()
            if self._keeper.is_open:
                self._feed(Stopping())
                await self._keeper.write(flush=True)
            await asyncio.to_thread(self._close_stores)

    async def infer(self, inputs: Inputs) -> Prediction:
        """The serving model's answer to ``inputs`` (arrays by input name), counted like
        every inference here (telemetry, a soak); it names the release that gave it.

        Raises:
            agent.InferenceError: ``InvalidInputError``, ``NotReadyError`` (no model yet, see
                :meth:`until_serving`), ``OverloadedError`` or ``InferenceFailedError``.
        """
        return await self._inference.infer(inputs)

    async def until_serving(self) -> None:
        """Return once a model serves (restored at start, or fetched)."""
        await self._inference.until_ready()

    async def __aenter__(self) -> Agent:
        """Run in the background (``async with agent: await agent.infer(...)``)."""
        self._task = task = asyncio.create_task(self.run())
        ready = asyncio.ensure_future(self.ready.wait())
        await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if task.done():
            await task  # raises what ended it
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stop cleanly (:meth:`request_stop`) and wait for the agent to end."""
        task, self._task = self._task, None
        if task is not None:
            self.request_stop()
            await task

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
            await self._journal.commit_window()
        self._journal.ready.set()
        # Give the flush a moment to deliver what is queued; what it cannot send stays
        # in the outbox for the next start.
        with contextlib.suppress(TimeoutError, sqlite3.Error, OSError):
            async with asyncio.timeout(self._config.stop_flush_s):
                while self.link.connected:
                    if not await asyncio.to_thread(self._journal.outbox.unsent):
                        break
                    await asyncio.sleep(0.05)
        raise _Stopped

    def _close_stores(self) -> None:
        self._journal.outbox.close()
        self._keeper.close()

    async def _supervise(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run ``loop`` for ever: an error is logged and the loop restarted after a
        backoff, so no support task can take inference down. Cancellation goes through."""
        retry = Retry(UpdateEngine.retry_policy(self._config.retry_s, self._config.retry_max_s))
        while True:
            started = time.monotonic()
            try:
                await loop()
            except Exception:  # the point: log anything, and restart
                retry.linked(time.monotonic() - started)  # it had run fine for a while
                delay = retry.next_delay()
                log.exception(
                    "%s: %s task failed; restarting in %.1f s", self.device_id, name, delay
                )
            else:
                delay = retry.next_delay()
                log.error("%s: %s task ended; restarting in %.1f s", self.device_id, name, delay)
            await asyncio.sleep(delay)

    async def _restore(self) -> None:
        """Rebuild from the local store: trust, manifest, and the model being served. A
        damaged state file is set aside; the retained trust and manifest and the model
        store then bring the device back (the manifest's seq and target come with the
        retained manifest, the model from the store, checked against its sha256)."""
        try:
            state = await self._keeper.load()
        except DamagedFileError as exc:
            state = self._keeper.state
            await self._journal.damaged(
                exc,
                "lost: the trust, applied manifest seq, active release, known-good and "
                "failed releases and last health report it held; rebuilding them from the "
                "retained trust and manifest and the model store",
                set_aside_file=True,
            )
        except OSError as exc:
            state = self._keeper.state
            self._feed(StorageFailed(StoragePart.STATE, str(exc), self._clock()))
        restored = self._intake.restore(
            trust=state.trust,
            manifest=state.manifest,
            applied_seq=state.applied_seq,
            now=self._clock(),
        )
        for problem in restored.problems:
            log.warning("%s: %s", self.device_id, problem)
        serving, trouble = await self._updater.load_active(state.active)
        memory = StateKeeper.memory_of(state)
        self._feed(Restored(memory, serving=serving, now=self._clock(), trouble=trouble))
        if restored.desired is not None:
            self._feed(Targeted(restored.desired, self._clock()))
        # Open the outbox now, so that damage it finds is told at once.
        with contextlib.suppress(sqlite3.Error, OSError):
            await self._journal.do(partial(len, self._journal.outbox))
        await self._journal.tell_damage()

    # -- what comes in -----------------------------------------------------------------

    async def receive(self, message: Message) -> None:
        """Take one message, as the link hands every message it receives: trust and
        the class manifest to the intake, artifact chunks to the fetch that wants them."""
        try:
            parsed = topics.parse(message.topic)
        except RejectedError as exc:
            log.warning("%s: ignoring %s", self.device_id, exc)
            return
        now = self._clock()
        if parsed.kind is TopicKind.TRUST:
            await self._take(self._intake.trust(message.payload, now=now))
        elif parsed.kind is TopicKind.CLASS_MANIFEST:
            await self._take(self._intake.manifest(message.payload, now=now))
        elif parsed.kind in (TopicKind.ARTIFACT_META, TopicKind.ARTIFACT_CHUNK):
            self._fetcher.offer(message)

    async def _take(self, outcomes: list[Outcome]) -> None:
        """Act on what the intake made of signed bytes: memory first, then the disk (a
        failed write must not leave the target unset while the bytes count as judged)."""
        for outcome in outcomes:
            if isinstance(outcome, TrustTaken):
                log.info("%s: trust version %d", self.device_id, outcome.doc.version)
                self._keeper.remember(trust=outcome.payload)
            elif isinstance(outcome, ManifestTaken):
                self._keeper.remember(manifest=outcome.payload, applied_seq=outcome.manifest.seq)
                self._feed(Targeted(outcome.desired, self._clock()))
            else:
                await self._refused(outcome)
                continue
            self.link.state_changed()
            await self._keeper.write()

    async def _refused(self, refused: Refused) -> None:
        log.warning("%s: %s: %s: %s", self.device_id, refused.kind, refused.reason, refused.detail)
        self._updater.note(refused.reason, refused.detail)
        await self._journal.emit(refused.kind, refused.reason.value, refused.detail, None)
