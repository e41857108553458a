"""The agent's link to the broker: the one place that opens a :class:`Session`.

It keeps a session up (paho reconnects within one; this loop covers a broker that was
unreachable when the agent started, with the project's backoff), subscribes to the trust,
the device's class manifest and its telemetry ack, and hands every other message to the
agent's dispatcher. On every (re)connect it re-asserts the device's retained topics
(presence, state, last health report) and flushes the outbox: an event leaves it once the
broker acknowledged it, a telemetry summary once the coordinator's ack covers it
(``devices/{id}/ack``, retained); summaries the broker took but no ack covers are sent
again when due (:class:`agent.outbox.Outbox`), and all at once after a reconnect. State is
published on every change and periodically for liveness.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import Final

from agent.journal import Journal
from broker.backoff import RECONNECT, Retry
from broker.session import Session
from broker.transport import Endpoint, Message, Transport, TransportError, Will
from schemas import (
    OFFLINE,
    ONLINE,
    DeviceState,
    HealthReport,
    RejectedError,
    TelemetryAck,
    decode,
    encode,
    topics,
)
from schemas.topics import DeviceChannel

__all__ = ["STATE_SETTLE_S", "Link", "settle_delay"]

log = logging.getLogger(__name__)

STATE_SETTLE_S: Final = 1.0
"""How long a changed state waits at least before it is published (see ``Link._state_loop``)."""


_JITTER = random.Random()  # noqa: S311 (jitter, not a secret)
"""The jitter's own generator: the global one's state stays the application's."""


def settle_delay(settle_s: float, rand: Callable[[], float] = _JITTER.random) -> float:
    """How long one changed state waits: ``settle_s`` to twice that, at random, so that a
    fleet answering one manifest spreads its states (and its liveness timers, which start
    from them) instead of sending them all in the same instant."""
    return settle_s * (1.0 + rand())


def _only_transport(exc: BaseException) -> bool:
    """Whether ``exc`` (or every leaf of an exception group) is a lost connection."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_transport(e) for e in exc.exceptions)
    return isinstance(exc, TransportError)


class Link:
    """The session of one device, while there is one (:attr:`session`)."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        device_id: str,
        hw_class: str,
        journal: Journal,
        dispatch: Callable[[Message], Awaitable[None]],
        state: Callable[[], DeviceState],
        last_health: Callable[[], HealthReport | None],
        reconnect_s: float,
        retry_s: float,
        state_interval_s: float,
        flush_batch: int,
        state_settle_s: float = STATE_SETTLE_S,
    ) -> None:
        self._endpoint = endpoint
        self._device_id = device_id
        self._hw_class = hw_class
        self._journal = journal
        self._dispatch = dispatch
        self._state = state
        self._last_health = last_health
        policy = replace(
            RECONNECT, initial=reconnect_s, maximum=max(RECONNECT.maximum, reconnect_s)
        )
        self._retry = Retry(policy)
        self._retry_s = retry_s
        self._state_interval_s = state_interval_s
        self._state_settle_s = state_settle_s
        self._flush_batch = flush_batch
        self._ack_topic = topics.device_ack(device_id)
        self._next_due: float | None = None
        """When the next summary waiting for the coordinator's ack is due again."""
        self._state_changed = asyncio.Event()
        self.session: Session | None = None

    @property
    def transport(self) -> Transport | None:
        return self.session

    @property
    def connected(self) -> bool:
        return self.session is not None and self.session.connected

    def state_changed(self) -> None:
        """Publish the state soon."""
        self._state_changed.set()

    async def run(self) -> None:
        """Keep a session to the broker, for ever."""
        will = Will(
            topic=topics.device(self._device_id, DeviceChannel.PRESENCE),
            payload=OFFLINE,
            retain=True,
        )
        while True:
            started = time.monotonic()
            try:
                async with Session(self._endpoint, client_id=self._device_id, will=will) as session:
                    await self._linked(session)
            except Exception as exc:  # whatever ends a session, the next one starts
                self._retry.linked(time.monotonic() - started)
                delay = self._retry.next_delay()
                if _only_transport(exc):
                    log.warning(
                        "%s: broker unreachable (%s); serving on, again in %.1f s",
                        self._device_id,
                        exc,
                        delay,
                    )
                else:
                    log.exception("%s: link failed; reconnecting in %.1f s", self._device_id, delay)
            else:  # pragma: no cover (a session only ends by an error or cancellation)
                delay = self._retry.next_delay()
            finally:
                self.session = None
            await asyncio.sleep(delay)

    async def _linked(self, session: Session) -> None:
        await session.subscribe(
            topics.trust(), topics.class_manifest(self._hw_class), self._ack_topic
        )
        self.session = session
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._reassert_on_connect(session))
                tg.create_task(self._receive(session))
                tg.create_task(self._flush_loop(session))
                tg.create_task(self._state_loop())
        finally:
            if session.connected:
                with contextlib.suppress(TransportError):
                    if self._state_changed.is_set():  # still settling: not left behind
                        await session.publish(
                            topics.device(self._device_id, DeviceChannel.STATE),
                            encode(self._state()),
                            retain=True,
                            timeout=2.0,
                        )
                    await session.publish(
                        topics.device(self._device_id, DeviceChannel.PRESENCE),
                        OFFLINE,
                        retain=True,
                        timeout=2.0,
                    )

    async def _reassert_on_connect(self, session: Transport) -> None:
        async for _ in session.connections():
            try:
                await session.publish(
                    topics.device(self._device_id, DeviceChannel.PRESENCE), ONLINE, retain=True
                )
                await self.publish_state()
                report = self._last_health()
                if report is not None:
                    await self.publish_retained(DeviceChannel.HEALTH, encode(report))
            except TransportError as exc:
                log.info("%s: re-assert failed: %s", self._device_id, exc)
            # The broker may have lost what it acknowledged before: send it all again.
            with contextlib.suppress(sqlite3.Error, OSError):  # told as storage trouble
                await self._journal.do(self._journal.outbox.due_again)
            self._journal.ready.set()

    async def _receive(self, session: Transport) -> None:
        async for message in session.messages():
            try:
                if message.topic == self._ack_topic:
                    await self._acknowledged(message.payload)
                else:
                    await self._dispatch(message)
            except Exception:  # one bad message must not end the link, nor the agent
                log.exception("%s: message on %s not handled", self._device_id, message.topic)

    async def _acknowledged(self, payload: bytes) -> None:
        """The coordinator's ack: forget the summaries it counted."""
        if not payload:
            return  # cleared
        try:
            ack = decode(payload, TelemetryAck)
        except RejectedError as exc:
            log.warning("%s: ignoring a telemetry ack: %s", self._device_id, exc)
            return
        if ack.device_id != self._device_id:
            log.warning("%s: ignoring a telemetry ack for %s", self._device_id, ack.device_id)
            return
        outbox = self._journal.outbox
        try:
            await self._journal.do(partial(outbox.acknowledge, ack.stream, ack.seq))
        except (sqlite3.Error, OSError) as exc:
            # Kept: sent again when due, and the coordinator acknowledges it again.
            log.info("%s: telemetry ack not applied: %s", self._device_id, exc)

    async def _flush_loop(self, session: Transport) -> None:
        """Send the outbox in order, and again what is due; settle what the broker
        acknowledged, and mark the rest sent (the client may still deliver it: it must
        not be merged)."""
        journal = self._journal
        while True:
            # Offline, nothing is due: the next connection sets ``ready``.
            due = self._next_due if session.connected else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if due is None else due - time.monotonic()):
                    await journal.ready.wait()
            journal.ready.clear()
            while session.connected:
                if not await self._flush_batch_of(session):
                    break

    async def _flush_batch_of(self, session: Transport) -> bool:
        """Send one batch; False once nothing is due."""
        journal, outbox = self._journal, self._journal.outbox
        now = time.monotonic()
        try:
            items = await journal.do(partial(outbox.peek, self._flush_batch, now=now))
            if not items:
                self._next_due = await journal.do(outbox.next_due)
        except (sqlite3.Error, OSError) as exc:
            # Storage trouble (in the state) or another writer: try again later.
            log.info("%s: outbox not readable, retrying: %s", self._device_id, exc)
            await asyncio.sleep(self._retry_s)
            return True
        if not items:
            return False
        results = await asyncio.gather(
            *(session.publish(i.topic, i.payload, qos=1) for i in items),
            return_exceptions=True,
        )
        acked = [i.id for i, r in zip(items, results, strict=True) if r is None]
        unacked = [i.id for i, r in zip(items, results, strict=True) if r is not None]
        try:
            await journal.do(partial(outbox.settle, acked, unacked, now=time.monotonic()))
        except (sqlite3.Error, OSError) as exc:
            # Acked rows stay and go again: duplicates, which consumers drop.
            log.info("%s: outbox not settled, retrying: %s", self._device_id, exc)
            await asyncio.sleep(self._retry_s)
            return True
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            log.info("%s: %d unsent, retrying: %s", self._device_id, len(failures), failures[0])
            await asyncio.sleep(self._retry.policy.initial)
        return True

    async def _state_loop(self) -> None:
        """Publish state on every change, and periodically for liveness. A change
        waits ``state_settle_s`` to twice that first (:func:`settle_delay`): the changes
        that follow it (a manifest taken, then its fetch and load) leave with it as one
        message, and a fleet answers a class manifest once the broker has fanned it out,
        not while it does, spread over a second rather than all at once."""
        while True:
            self._state_changed.clear()
            await self.publish_state()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._state_interval_s):
                    await self._state_changed.wait()
            if self._state_changed.is_set():
                await asyncio.sleep(settle_delay(self._state_settle_s))

    async def publish_state(self) -> None:
        await self.publish_retained(DeviceChannel.STATE, encode(self._state()))

    async def publish_retained(self, channel: DeviceChannel, payload: bytes) -> None:
        """Publish one of the device's retained topics, if linked (else it is
        re-asserted on the next connect)."""
        session = self.session
        if session is None or not session.connected:
            return
        try:
            await session.publish(topics.device(self._device_id, channel), payload, retain=True)
        except TransportError as exc:
            log.info(
                "%s: %s not published (re-asserted on reconnect): %s",
                self._device_id,
                channel,
                exc,
            )
