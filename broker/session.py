"""An asyncio MQTT v5 session: one connection to the broker, kept up, with acknowledgements.

Theory of operation
-------------------
Three layers, each with one job:

- :mod:`broker.driver` drives one paho client from the event loop through its socket
  callbacks (``add_reader``/``add_writer``, ``loop_misc`` once a second): no thread per
  connection and no ``select()``, so a process holds thousands of sessions. Opening a
  connection (TCP, TLS, websocket upgrade) runs in short-lived threads, a few at once.
- :class:`broker.link.LinkState`, sans-IO, decides what the session may believe: pending
  packet ids, acks tagged by connection, "up only after the re-SUBACKs", the remembered
  subscriptions and the bounded incoming queue.
- :class:`Session` (here) feeds the driver's events to the state, carries out what it
  answers, wakes the coroutines that wait, and reconnects. It satisfies
  :class:`broker.transport.Transport`. Everything runs on the event loop thread: no locks.

Reconnection is ours: after a drop the session waits a delay of
:data:`broker.backoff.RECONNECT` (jittered: a fleet that lost its broker does not come back
in lockstep) and tries again. A lost connection and every connection that cannot be made
are logged at WARNING with their cause (the first failure of a run, then one line per
``_WARN_EVERY`` seconds). After a reconnect without a session present the subscriptions
are sent again, paho resends unacknowledged QoS 1 publishes, a SUBSCRIBE or UNSUBSCRIBE
cut off by the drop is sent again, and :meth:`Session.connections` yields once the
re-subscriptions are acknowledged, so owners can re-assert their retained topics.

Why not aiomqtt: it ignores PUBACK reason codes (a publish the ACL refused, 0x87, looks
like a success); here a failure reason code raises :class:`PublishRefused`.

Leaving the ``async with`` normally sends a plain DISCONNECT: the broker discards the Last
Will. Leaving it by an exception (a crash, a cancellation) sends DISCONNECT with reason
code 0x04, "Disconnect with Will Message": the broker publishes the Will, so a process that
dies of an error reads ``offline`` exactly like one that was killed. A broker that does not
take the DISCONNECT within ``_STOP_GRACE`` seconds has the socket cut.

Incoming QoS 1 messages are acknowledged when the consumer takes them (one by one from
:meth:`Session.messages`, a burst by :meth:`Session.take_waiting`), not when they arrive,
and only on the connection they came on; the CONNECT announces a Receive Maximum: a slow
consumer therefore holds the broker back (which queues for us) instead of losing messages.
QoS 0 messages beyond ``incoming_limit`` are dropped and reported by
:class:`IncomingOverflow` from the iterator: never silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from types import TracebackType
from typing import Self

from broker.backoff import RECONNECT, Retry
from broker.driver import DriverEvents, PahoDriver
from broker.link import Ack, LinkState, Settled
from broker.transport import (
    ConnectRefused,
    Endpoint,
    IncomingOverflow,
    Message,
    PublishRefused,
    SubscribeRefused,
    TransportError,
    Will,
)

__all__ = [
    "ConnectRefused",
    "Endpoint",
    "IncomingOverflow",
    "Message",
    "PublishRefused",
    "Session",
    "SubscribeRefused",
    "TransportError",
    "Will",
]

_log = logging.getLogger(__name__)

_FAILURE = 0x80  # MQTT 5: reason codes >= 0x80 are failures (0x10 "no subscribers" is not)
_STOP_GRACE = 2.0  # seconds a clean DISCONNECT may take before we cut the socket
_WARN_EVERY = 30.0  # seconds between two warnings of one run of failed reconnects

_Codes = tuple[int, ...] | None


class Session:
    """One MQTT v5 connection, kept up and driven from asyncio. Async context manager."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        client_id: str,
        clean_start: bool = True,
        session_expiry: int = 0,
        will: Will | None = None,
        keepalive: int = 15,
        connect_timeout: float = 10.0,
        incoming_limit: int = 10_000,
    ) -> None:
        if not client_id:
            msg = "client_id must not be empty"
            raise ValueError(msg)
        if session_expiry < 0 or incoming_limit < 1 or keepalive < 1:
            msg = "session_expiry must be >= 0, incoming_limit and keepalive >= 1"
            raise ValueError(msg)
        self._client_id = client_id
        self._connect_timeout = connect_timeout
        self._link = LinkState(incoming_limit=incoming_limit)
        events = DriverEvents(
            accepted=self._accepted,
            refused=self._finish_opening,
            puback=lambda mid, code: self._settle(self._link.puback(mid, code)),
            suback=self._suback,
            unsuback=lambda mid, codes: self._settle(self._link.unsuback(mid, codes)),
            message=self._arrived,
            lost=self._lost,
        )
        self._driver = PahoDriver(
            endpoint,
            events,
            client_id=client_id,
            clean_start=clean_start,
            session_expiry=session_expiry,
            will=will,
            keepalive=keepalive,
            connect_timeout=connect_timeout,
            receive_maximum=incoming_limit,
        )
        self._waiters: dict[int, asyncio.Future[_Codes]] = {}
        self._up: asyncio.Future[None] | None = None  # the connection being opened
        self._changed = asyncio.Event()
        self._incoming_event = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None
        self._consumer = False
        self._entered = False

    # -- public state ----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the session is up right now (subscriptions included)."""
        return self._link.connected

    @property
    def generation(self) -> int:
        """Which connection is up: the counter ``connections()`` yields."""
        return self._link.generation

    @property
    def client_id(self) -> str:
        """The MQTT client id."""
        return self._client_id

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Connect and wait for a successful CONNACK.

        Raises:
            ConnectRefused: the broker refused the connection (credentials, ACL on the Will).
            TransportError: the broker could not be reached, TLS failed, or no CONNACK came
                within ``connect_timeout``.
        """
        if self._entered:
            msg = "a Session can be entered only once"
            raise RuntimeError(msg)
        self._entered = True
        try:
            await self._open()
        except BaseException:
            await self._shutdown()
            raise
        self._keeper = asyncio.create_task(self._keep_up(), name=f"mqtt-{self._client_id}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Send DISCONNECT and close. On a normal exit the broker then discards the Will;
        on an exit by an exception it publishes it (reason code 0x04)."""
        await self._shutdown(with_will=exc_type is not None)

    async def _open(self) -> None:
        """Open one connection and wait until it is up (CONNACK and re-SUBACKs).

        Raises:
            ConnectRefused: the CONNACK carried a failure reason code.
            TransportError: no connection, or not up within ``connect_timeout``.
        """
        up = self._up = asyncio.get_running_loop().create_future()
        try:
            deadline = await self._driver.open()
            async with asyncio.timeout_at(deadline):
                await up
        except TimeoutError:
            self._driver.cut()
            msg = f"no CONNACK (or re-SUBACK) within {self._connect_timeout} s"
            raise TransportError(msg) from None
        finally:
            if not up.done():
                up.cancel()

    async def _keep_up(self) -> None:
        """Serve the connection until it is lost, then reconnect with backoff; forever."""
        loop = asyncio.get_running_loop()
        retry = Retry(RECONNECT)
        while True:
            since = loop.time()
            why = await self._driver.serve()
            retry.linked(loop.time() - since)
            _log.warning("%s: connection lost: %s", self._client_id, why)
            warned: float | None = None  # when this run of failures was last logged
            while True:
                await asyncio.sleep(retry.next_delay())
                try:
                    await self._open()
                    break
                except TransportError as exc:
                    if warned is None or loop.time() - warned >= _WARN_EVERY:
                        warned = loop.time()
                        what = f"reconnect failed ({retry.failures} in a row): {exc}"
                        _log.warning("%s: %s", self._client_id, what)
            _log.info("%s: reconnected (generation %d)", self._client_id, self.generation)

    async def _shutdown(self, *, with_will: bool = False) -> None:
        if self._link.closed:
            return
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        for mid in self._link.close():
            fut = self._waiters.pop(mid, None)
            if fut is not None and not fut.done():
                fut.set_exception(TransportError("session closed"))
                fut.exception()  # retrieved: the awaiting coroutine may already be gone
        await self._driver.close(with_will=with_will, grace=_STOP_GRACE)
        self._notify_changed()
        self._incoming_event.set()

    # -- what the driver reports (on the loop thread) ---------------------------------

    def _accepted(self, session_present: bool) -> None:
        batches = self._link.accepted(session_present=session_present)
        mids = [self._driver.subscribe(b.filters, b.qos) for b in batches]
        self._came_up(self._link.resubscribing(mids))

    def _finish_opening(self, error: BaseException | None = None) -> None:
        up = self._up
        if up is not None and not up.done():
            up.set_result(None) if error is None else up.set_exception(error)

    def _suback(self, mid: int, codes: list[int]) -> None:
        settled, generation = self._link.suback(mid, codes)
        self._settle(settled)
        self._came_up(generation)

    def _came_up(self, generation: int | None) -> None:
        if generation is not None:
            self._finish_opening()
            self._notify_changed()

    def _lost(self, reason: str) -> None:
        was_up = self._link.connected
        for settled in self._link.lost():
            self._settle(settled)
        self._finish_opening(TransportError(f"connection closed before it was up: {reason}"))
        if was_up:
            self._notify_changed()

    def _arrived(self, message: Message, mid: int) -> None:
        self._link.arrived(message, mid)
        self._incoming_event.set()

    def _settle(self, settled: Settled | None) -> None:
        if settled is None:
            return
        fut = self._waiters.pop(settled.mid, None)
        if fut is not None and not fut.done():
            fut.set_result(settled.codes)

    def _notify_changed(self) -> None:
        # Waiters hold the old event; swapping in a fresh one makes this an edge trigger.
        self._changed.set()
        self._changed = asyncio.Event()

    # -- operations ----------------------------------------------------------------------

    def _require_open(self) -> None:
        if not self._entered or self._link.closed:
            msg = "session is not open"
            raise RuntimeError(msg)

    async def _wait_connected(self) -> None:
        while not self._link.connected:
            if self._link.closed:
                msg = "session closed"
                raise TransportError(msg)
            await self._changed.wait()

    async def _settled(self, mid: int) -> _Codes:
        """Wait for what the broker answers to ``mid`` (None: dropped before an answer)."""
        fut: asyncio.Future[_Codes] = asyncio.get_running_loop().create_future()
        self._waiters[mid] = fut
        try:
            return await fut
        finally:
            if self._waiters.get(mid) is fut:
                del self._waiters[mid]
                self._link.abandon(mid)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout: float = 30.0,
    ) -> None:
        """Publish and, for QoS > 0, wait until the broker acknowledged it.

        While disconnected the message waits in paho's queue and is sent on reconnect.
        After a timeout it may still be sent later (QoS 1 is at-least-once anyway).

        Raises:
            PublishRefused: the PUBACK carried a failure reason code (0x87: not authorized).
            TransportError: not acknowledged within ``timeout``, or the session closed.
            ValueError: invalid topic or QoS.
        """
        self._require_open()
        try:
            async with asyncio.timeout(timeout):
                # Not while the pool opens a socket: a PUBLISH must not slip in before the
                # CONNECT (paho writes to the new socket as soon as it exists).
                await self._driver.settle()
                if self._link.closed:  # closed while it waited: fail as a pending one would
                    msg = "session closed"
                    raise TransportError(msg)
                mid = self._driver.publish(topic, payload, qos=qos, retain=retain)
                if qos == 0:
                    return
                self._link.publishing(mid)
                codes = await self._settled(mid)
        except TimeoutError:
            msg = f"publish to {topic!r} not acknowledged within {timeout} s"
            raise TransportError(msg) from None
        code = codes[0] if codes else 0
        if code >= _FAILURE:
            raise PublishRefused(topic, code)

    async def _request(
        self, send: Callable[[], int | None], what: str, limit: float
    ) -> tuple[int, ...]:
        """Send SUBSCRIBE/UNSUBSCRIBE until acknowledged on a live connection."""
        try:
            async with asyncio.timeout(limit):
                while True:
                    await self._wait_connected()
                    mid = send()
                    if mid is None:
                        await self._changed.wait()  # raced with a disconnect
                        continue
                    self._link.requesting(mid)
                    codes = await self._settled(mid)
                    if codes is not None:
                        return codes
        except TimeoutError:
            msg = f"{what} not acknowledged within {limit} s"
            raise TransportError(msg) from None

    async def subscribe(
        self,
        *topic_filters: str,
        qos: int = 1,
        timeout: float = 30.0,
    ) -> None:
        """Subscribe and wait for the SUBACK; the filters are re-subscribed on every reconnect.

        Note that Mosquitto's ACLs do not refuse subscriptions: they filter what is delivered.

        Raises:
            SubscribeRefused: the SUBACK refused a filter (it is then forgotten).
            TransportError: not acknowledged within ``timeout``, or the session closed.
        """
        self._require_open()
        if not topic_filters:
            return
        self._link.remember(topic_filters, qos)
        codes = await self._request(
            lambda: self._driver.subscribe(topic_filters, qos),
            f"subscribe {topic_filters}",
            timeout,
        )
        for topic_filter, code in zip(topic_filters, codes, strict=False):
            if code >= _FAILURE:
                self._link.forget([topic_filter])
                raise SubscribeRefused(topic_filter, code)

    async def unsubscribe(
        self,
        *topic_filters: str,
        timeout: float = 30.0,
    ) -> None:
        """Unsubscribe and wait for the UNSUBACK; the filters are no longer re-subscribed.

        Raises:
            TransportError: not acknowledged within ``timeout``, or the session closed.
        """
        self._require_open()
        if not topic_filters:
            return
        self._link.forget(topic_filters)
        await self._request(
            lambda: self._driver.unsubscribe(topic_filters),
            f"unsubscribe {topic_filters}",
            timeout,
        )

    def messages(self) -> _Messages:
        """Iterate over incoming messages; ends when the session closes. One consumer only.

        The iterator raises :class:`IncomingOverflow` if QoS 0 messages had to be dropped.

        Raises:
            RuntimeError: a second consumer asked for an iterator.
        """
        if self._consumer:
            msg = "messages() supports a single consumer"
            raise RuntimeError(msg)
        self._consumer = True
        return _Messages(self)

    def connections(self) -> _Connections:
        """Yield a counter once per successful (re)connect, the current connection first;
        after a clean reconnect, only once the broker acknowledged the re-subscriptions.

        Several reconnects in quick succession may be reported once (the latest); what an
        owner needs is to re-assert its retained topics on the connection that is up.
        """
        return _Connections(self)

    def take_waiting(self, limit: int) -> list[Message]:
        """Up to ``limit`` messages that already arrived, in order, acknowledged as taken:
        a burst at once for the consumer of :meth:`messages` (a drop is left to it)."""
        return [self._acked(taken) for taken in self._link.take_waiting(limit)]

    def _acked(self, taken: tuple[Message, Ack | None]) -> Message:
        if (ack := taken[1]) is not None:
            self._driver.ack(ack.mid, ack.qos)
        return taken[0]


class _Messages:
    """Async iterator over a session's incoming messages (a class, not an async generator,
    so abandoning it mid-way leaves no generator to finalize)."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Message:
        session, link = self._session, self._session._link
        while True:
            taken = link.take()
            if taken is not None:
                return session._acked(taken)
            if link.closed:
                raise StopAsyncIteration
            session._incoming_event.clear()
            await session._incoming_event.wait()


class _Connections:
    """Async iterator over a session's connection counter."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._seen = 0

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> int:
        link = self._session._link
        while not link.closed:
            if link.connected and link.generation > self._seen:
                self._seen = link.generation
                return self._seen
            await self._session._changed.wait()
        raise StopAsyncIteration
