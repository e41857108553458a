"""An asyncio MQTT v5 session over paho-mqtt: the only module of the project importing paho.

Theory of operation
-------------------
paho is driven from the event loop through its socket callbacks, as its own asyncio
example and aiomqtt do: no network thread per session and no ``select()`` (which fails
for descriptors numbered 1024 and above), so one process holds thousands of sessions.
The socket is watched with ``add_reader`` (paho's ``loop_read``) and, while paho has bytes
to send, ``add_writer`` (``loop_write``); a task per session calls ``loop_misc`` about once
a second for keepalive pings and timeouts. Every paho callback therefore runs on the event
loop thread, and the state needs no locks.

What the session may believe about its link (pending packet ids, acks by connection,
"up only after the re-SUBACKs", the remembered subscriptions, the incoming queue) lives in
the sans-IO :class:`broker.link.LinkState`; this module feeds it paho's events and carries
out what it answers.

Opening a connection (TCP connect, TLS handshake, websocket upgrade, all blocking in paho)
runs on the event loop's default executor, a small bounded pool shared by every session;
paho's CONNECT is then written by the loop. Reconnecting is ours: after a drop the session
waits a delay of :data:`broker.backoff.RECONNECT` (with jitter, so a fleet that lost its
broker does not come back in lockstep) and tries again; every connection that cannot be
made is logged at WARNING with its cause (the first of a run of failures, then at most one
line per ``_WARN_EVERY`` seconds). Every socket sends with ``TCP_NODELAY``.

After every reconnect without a session present, the remembered subscriptions are sent
again; unacknowledged QoS 1 publishes are resent by paho; :meth:`Session.connections`
yields once the re-subscriptions are acknowledged, so owners can re-assert their retained
topics. A SUBSCRIBE or UNSUBSCRIBE cut off by a drop is sent again on the next connection.

Why not aiomqtt: it ignores PUBACK reason codes, so a publish refused by the broker's ACL
(0x87) looks like a success. Here a failure reason code raises :class:`PublishRefused`.

Leaving the ``async with`` normally sends a plain DISCONNECT: the broker discards the Last
Will. Leaving it by an exception (a crash, a cancellation) sends DISCONNECT with reason
code 0x04, "Disconnect with Will Message": the broker publishes the Will, so a process that
dies of an error reads ``offline`` exactly like one that was killed. A broker that does not
take the DISCONNECT within ``_STOP_GRACE`` seconds has the socket cut.

Incoming QoS 1 messages are acknowledged when the consumer takes them from
:meth:`Session.messages`, not when they arrive, and only on the connection they came on;
the CONNECT announces a Receive Maximum: a slow consumer therefore holds the broker back
(which queues for us) instead of losing messages. QoS 0 messages beyond
``incoming_limit`` are dropped and reported by :class:`IncomingOverflow` from the iterator:
never silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from broker.backoff import RECONNECT, Retry
from broker.link import LinkState, Settled
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
_MISC_EVERY = 1.0  # seconds between loop_misc calls (keepalive, ping timeout)
_WARN_EVERY = 30.0  # seconds between two warnings of one run of failed reconnects
_MAX_RECEIVE = 65535
_DISCONNECT_WITH_WILL = 0x04

_Codes = tuple[int, ...] | None


def _no_delay(_client: mqtt.Client, _userdata: object, sock: Any) -> None:
    """MQTT packets are small (a PUBACK, a presence): they must not wait for Nagle and the
    peer's delayed ACK (tens of ms per publish). Set through the descriptor, so it reaches
    the TCP socket under a TLS or websocket wrapper too. Called by paho on every socket."""
    with contextlib.suppress(AttributeError, OSError):
        dup = socket.socket(fileno=os.dup(sock.fileno()))
        try:
            dup.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        finally:
            dup.close()


def _shut_down(sock: Any) -> None:
    """End the connection under every holder of ``sock`` without closing their descriptor:
    ``shutdown()`` on a dup works for TLS and websocket wrappers alike. No DISCONNECT."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        dup = socket.socket(fileno=os.dup(sock.fileno()))
        try:
            dup.shutdown(socket.SHUT_RDWR)
        finally:
            dup.close()


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
        self._endpoint = endpoint
        self._client_id = client_id
        self._clean_start = clean_start
        self._session_expiry = session_expiry
        self._will = will
        self._keepalive = keepalive
        self._connect_timeout = connect_timeout
        self._incoming_limit = incoming_limit

        self._link = LinkState(incoming_limit=incoming_limit)
        self._client: mqtt.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: Any = None  # the socket registered with the loop
        self._waiters: dict[int, asyncio.Future[_Codes]] = {}
        self._up: asyncio.Future[None] | None = None  # the connection being opened
        self._lost = asyncio.Event()  # the registered socket closed
        self._changed = asyncio.Event()
        self._incoming_event = asyncio.Event()
        self._opening: asyncio.Future[MQTTErrorCode] | None = None  # reconnect() in the pool
        self._why_lost = "unknown"  # the reason paho gave for the last disconnect
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

    def _make_client(self) -> mqtt.Client:
        ep = self._endpoint
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            transport=ep.transport,
            manual_ack=True,
        )
        client.tls_set(
            ca_certs=str(ep.ca_file),
            certfile=None if ep.cert_file is None else str(ep.cert_file),
            keyfile=None if ep.key_file is None else str(ep.key_file),
            cert_reqs=ssl.CERT_REQUIRED,
        )
        if ep.username is not None:
            client.username_pw_set(ep.username, ep.password)
        if self._will is not None:
            w = self._will
            client.will_set(w.topic, w.payload, qos=w.qos, retain=w.retain)
        client.connect_timeout = self._connect_timeout
        # Unlimited client-side queue: publish() callers are bounded by their own timeouts.
        client.max_queued_messages_set(0)
        client.on_connect = self._cb_connect
        client.on_disconnect = self._cb_disconnect
        client.on_publish = self._cb_publish
        client.on_subscribe = self._cb_subscribe
        client.on_unsubscribe = self._cb_unsubscribe
        client.on_message = self._cb_message
        client.on_socket_open = _no_delay
        client.on_socket_close = self._cb_socket_close
        client.on_socket_register_write = self._cb_register_write
        client.on_socket_unregister_write = self._cb_unregister_write
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if self._session_expiry:
            # Without this the broker discards the session at disconnect, whatever
            # clean_start says (MQTT 5 default expiry is 0).
            props.SessionExpiryInterval = self._session_expiry
        props.ReceiveMaximum = min(self._incoming_limit, _MAX_RECEIVE)
        client.connect_async(
            ep.host,
            ep.port,
            keepalive=self._keepalive,
            clean_start=self._clean_start,
            properties=props,
        )
        return client

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
        self._loop = asyncio.get_running_loop()
        self._client = self._make_client()
        try:
            await self._open()
        except BaseException:
            await self._shutdown()
            raise
        self._keeper = self._loop.create_task(self._keep_up(), name=f"mqtt-{self._client_id}")
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
        client = self._require_client()
        loop = asyncio.get_running_loop()
        ep = self._endpoint
        await self._settle_opening()
        up = self._up = loop.create_future()
        self._lost = asyncio.Event()
        self._why_lost = "unknown"
        # paho's reconnect() connects and shakes hands blocking; the pool bounds how many
        # run at once. Not cancelled with us: _opened() closes what comes too late.
        opening = self._opening = loop.run_in_executor(None, client.reconnect)
        opening.add_done_callback(lambda done: self._opened(done, up))
        try:
            async with asyncio.timeout(self._connect_timeout):
                await asyncio.shield(opening)
                await up
        except TimeoutError:
            self._cut()
            msg = f"no CONNACK from {ep.host}:{ep.port} within {self._connect_timeout} s"
            raise TransportError(msg) from None
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            msg = f"cannot connect to {ep.host}:{ep.port}: {exc}"
            raise TransportError(msg) from exc
        finally:
            if not up.done():
                up.cancel()

    async def _settle_opening(self) -> None:
        """Wait for a reconnect() still running in the pool (bounded by paho's socket
        timeouts): two on one client would share its state."""
        if self._opening is not None and not self._opening.done():
            await asyncio.wait([self._opening])

    def _opened(self, opening: asyncio.Future[MQTTErrorCode], up: asyncio.Future[None]) -> None:
        """On the loop, once paho opened a socket: watch it, or close it if nobody waits."""
        if opening.cancelled() or opening.exception() is not None:
            return
        client = self._client
        sock = None if client is None else client.socket()
        if client is None or sock is None:
            return
        loop = asyncio.get_running_loop()
        self._sock = sock
        loop.add_reader(sock.fileno(), self._read)
        if up.done() or self._link.closed:
            self._cut()
            return
        if client.want_write():
            loop.add_writer(sock.fileno(), self._write)

    async def _keep_up(self) -> None:
        """Serve the connection until it is lost, then reconnect with backoff; forever."""
        loop = asyncio.get_running_loop()
        retry = Retry(RECONNECT)
        while True:
            since = loop.time()
            await self._serve()
            retry.linked(loop.time() - since)
            _log.warning("%s: connection lost: %s", self._client_id, self._why_lost)
            warned = 0.0
            while True:
                await asyncio.sleep(retry.next_delay())
                try:
                    await self._open()
                    break
                except TransportError as exc:
                    if retry.failures == 1 or loop.time() - warned >= _WARN_EVERY:
                        warned = loop.time()
                        _log.warning(
                            "%s: reconnect failed (%d attempt(s) so far): %s",
                            self._client_id,
                            retry.failures,
                            exc,
                        )
            _log.info("%s: reconnected (generation %d)", self._client_id, self.generation)

    async def _serve(self) -> None:
        """Call ``loop_misc`` about once a second (pings, keepalive) until the socket closes."""
        client = self._client
        lost = self._lost
        while not lost.is_set() and client is not None:
            try:
                async with asyncio.timeout(_MISC_EVERY):
                    await lost.wait()
            except TimeoutError:
                client.loop_misc()

    async def _shutdown(self, *, with_will: bool = False) -> None:
        if self._link.closed:
            return
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        await self._settle_opening()
        client = self._client
        accepted = self._link.alive
        for mid in self._link.close():
            self._settle_failed(mid)
        if client is not None and self._sock is not None and accepted:
            reason = None
            if with_will:
                reason = ReasonCode(PacketTypes.DISCONNECT, identifier=_DISCONNECT_WITH_WILL)
            with contextlib.suppress(Exception):
                client.disconnect(reasoncode=reason)  # paho closes the socket once it is sent
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_STOP_GRACE):
                    await self._lost.wait()
            self._cut()  # the broker is unresponsive: end it without the DISCONNECT
        self._notify_changed()
        self._incoming_event.set()

    def _settle_failed(self, mid: int) -> None:
        fut = self._waiters.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_exception(TransportError("session closed"))
            fut.exception()  # retrieved: the awaiting coroutine may already be gone

    def _cut(self) -> None:
        """End the connection as a network failure would: shut the socket down and let
        paho read the end, close the socket and report the disconnect."""
        client = self._client
        if client is None or self._sock is None:
            return
        _shut_down(self._sock)
        while self._sock is not None and client.loop_read() == MQTTErrorCode.MQTT_ERR_SUCCESS:
            pass

    # -- the event loop drives paho ----------------------------------------------------

    def _read(self) -> None:
        client = self._client
        if client is None:
            return
        client.loop_read()
        # A TLS record may hold more than paho read: bytes the descriptor no longer signals.
        while (sock := self._sock) is not None and getattr(sock, "pending", int)() > 0:
            client.loop_read()

    def _write(self) -> None:
        if self._client is not None:
            self._client.loop_write()

    def _cb_register_write(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        # Called from the pool during reconnect() too: _opened() registers that socket.
        if sock is self._sock and self._loop is not None:
            self._loop.add_writer(sock.fileno(), self._write)

    def _cb_unregister_write(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        if sock is self._sock and self._loop is not None:
            self._loop.remove_writer(sock.fileno())

    def _cb_socket_close(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        if sock is not self._sock or self._loop is None:
            return
        self._loop.remove_reader(sock.fileno())
        self._loop.remove_writer(sock.fileno())
        self._sock = None
        was_up = self._link.connected
        for settled in self._link.lost():
            self._settle(settled)
        self._lost.set()
        if was_up:
            self._notify_changed()

    # -- paho's protocol callbacks (on the loop thread) ---------------------------------

    def _cb_connect(
        self,
        client: mqtt.Client,
        _userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            if self._up is not None and not self._up.done():
                self._up.set_exception(ConnectRefused(reason_code.value, str(reason_code)))
            return
        batches = self._link.accepted(session_present=flags.session_present)
        mids = [
            client.subscribe([(f, SubscribeOptions(qos=b.qos)) for f in b.filters])[1]
            for b in batches
        ]
        self._came_up(self._link.resubscribing(mids))

    def _came_up(self, generation: int | None) -> None:
        if generation is None:
            return
        if self._up is not None and not self._up.done():
            self._up.set_result(None)
        self._notify_changed()

    def _cb_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        # paho reports the reason after the socket closed (_cb_socket_close).
        self._why_lost = str(reason_code)
        if self._up is not None and not self._up.done():
            reason = f"connection closed before CONNACK: {reason_code}"
            self._up.set_exception(TransportError(reason))

    def _cb_publish(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        self._settle(self._link.puback(mid, reason_code.value))

    def _cb_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        settled, generation = self._link.suback(mid, [rc.value for rc in reason_codes])
        self._settle(settled)
        self._came_up(generation)

    def _cb_unsubscribe(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        self._settle(self._link.unsuback(mid, [rc.value for rc in reason_codes]))

    def _cb_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        message = Message(
            topic=msg.topic, payload=bytes(msg.payload), retain=msg.retain, qos=msg.qos
        )
        self._link.arrived(message, msg.mid)
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

    def _require_client(self) -> mqtt.Client:
        if self._client is None or self._link.closed:
            msg = "session is not open"
            raise RuntimeError(msg)
        return self._client

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
        client = self._require_client()
        info = client.publish(topic, payload, qos=qos, retain=retain)
        # QoS 1 waits in paho's queue while disconnected (NO_CONN); QoS 0 is lost then.
        queued = qos > 0 and info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS and not queued:
            msg = f"publish to {topic!r} failed: {mqtt.error_string(info.rc)}"
            raise TransportError(msg)
        if qos == 0:
            return
        self._link.publishing(info.mid)
        try:
            async with asyncio.timeout(timeout):
                codes = await self._settled(info.mid)
        except TimeoutError:
            msg = f"publish to {topic!r} not acknowledged within {timeout} s"
            raise TransportError(msg) from None
        code = codes[0] if codes else 0
        if code >= _FAILURE:
            raise PublishRefused(topic, code)

    async def _request(
        self, send: Callable[[], tuple[MQTTErrorCode, int | None]], what: str, limit: float
    ) -> tuple[int, ...]:
        """Send SUBSCRIBE/UNSUBSCRIBE until acknowledged on a live connection."""
        try:
            async with asyncio.timeout(limit):
                while True:
                    await self._wait_connected()
                    rc, mid = send()
                    if rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
                        await self._changed.wait()  # raced with a disconnect
                        continue
                    if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                        msg = f"{what} failed: {mqtt.error_string(rc)}"
                        raise TransportError(msg)
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
        client = self._require_client()
        if not topic_filters:
            return
        self._link.remember(topic_filters, qos)
        options = [(f, SubscribeOptions(qos=qos)) for f in topic_filters]
        codes = await self._request(
            lambda: client.subscribe(options), f"subscribe {topic_filters}", timeout
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
        client = self._require_client()
        if not topic_filters:
            return
        self._link.forget(topic_filters)
        await self._request(
            lambda: client.unsubscribe(list(topic_filters)),
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

    async def _next_message(self) -> Message:
        while True:
            taken = self._link.take()
            if taken is not None:
                message, ack = taken
                if ack is not None and self._client is not None:
                    self._client.ack(ack.mid, ack.qos)
                return message
            if self._link.closed:
                raise StopAsyncIteration
            self._incoming_event.clear()
            await self._incoming_event.wait()

    async def _next_connection(self, seen: int) -> int:
        while True:
            if self._link.closed:
                raise StopAsyncIteration
            if self._link.connected and self._link.generation > seen:
                return self._link.generation
            await self._changed.wait()


class _Messages:
    """Async iterator over a session's incoming messages (a class, not an async generator,
    so abandoning it mid-way leaves no generator to finalize)."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Message:
        return await self._session._next_message()


class _Connections:
    """Async iterator over a session's connection counter."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._seen = 0

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> int:
        self._seen = await self._session._next_connection(self._seen)
        return self._seen
