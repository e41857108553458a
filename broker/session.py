"""An asyncio MQTT v5 session over paho-mqtt: the only module of the project importing paho.

Theory of operation
-------------------
paho runs its network loop in its own thread (``loop_start``). Every paho callback does
nothing but hand its arguments to the event loop with ``call_soon_threadsafe``; all state
that coroutines look at (futures, the incoming queue, the connection counter) is only
touched on the event loop thread, so it needs no locks. The two exceptions are written by
the paho thread and guarded or atomic: the set of remembered subscriptions (a lock) and the
connection generation used to tag incoming messages (an int).

A request (PUBLISH QoS>0, SUBSCRIBE, UNSUBSCRIBE) is handed to paho and its packet id
registered in the same synchronous step on the event loop thread; the acknowledgement
callback is queued to that same thread, so it can never run before the registration.

Why not aiomqtt: it ignores PUBACK reason codes, so a publish refused by the broker's ACL
(0x87) looks like a success. Here a failure reason code raises :class:`PublishRefused`.

Reconnection is paho's (backoff 0.2..5 s). After every reconnect without a session present,
the remembered subscriptions are sent again (paho does not), unacknowledged QoS 1 publishes
are resent by paho, and :meth:`Session.connections` yields so owners can re-assert their
retained topics.

Leaving the ``async with`` normally sends a plain DISCONNECT: the broker discards the Last
Will. Leaving it by an exception (a crash, a cancellation) sends DISCONNECT with reason
code 0x04, "Disconnect with Will Message": the broker publishes the Will, so a process that
dies of an error reads ``offline`` exactly like one that was killed.

Incoming QoS 1 messages are acknowledged when the consumer takes them from
:meth:`Session.messages`, not when they arrive, and the CONNECT announces a Receive Maximum:
a slow consumer therefore holds the broker back (which queues for us) instead of losing
messages. QoS 0 messages beyond ``incoming_limit`` are dropped and reported by
:class:`IncomingOverflow` from the iterator: never silently.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

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
_RECONNECT_MIN = 0.2
_RECONNECT_MAX = 5
_STOP_GRACE = 2.0  # seconds a clean DISCONNECT may take before we cut the socket
_MAX_RECEIVE = 65535
_DISCONNECT_WITH_WILL = 0x04


def _no_delay(_client: mqtt.Client, _userdata: object, sock: Any) -> None:
    """MQTT packets are small (a PUBACK, a presence): they must not wait for Nagle and the
    peer's delayed ACK (tens of ms per publish). Called by paho on every new socket."""
    with contextlib.suppress(AttributeError, OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# -- session ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Incoming:
    message: Message
    mid: int
    generation: int  # connection the message arrived on; acks are only valid there


class Session:
    """One MQTT v5 connection, kept up by paho, driven from asyncio. Async context manager."""

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

        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: mqtt.Client | None = None
        self._closed = False
        # Event-loop-thread state.
        self._first: asyncio.Future[None] | None = None
        self._connected = False
        self._generation = 0
        self._changed = asyncio.Event()
        self._pub_pending: dict[int, asyncio.Future[int]] = {}
        self._req_pending: dict[int, asyncio.Future[list[int] | None]] = {}
        self._incoming: collections.deque[_Incoming] = collections.deque()
        self._incoming_event = asyncio.Event()
        self._dropped = 0
        self._consumer = False
        # Shared with the paho thread.
        self._subs_lock = threading.Lock()
        self._subs: dict[str, int] = {}
        self._thread_generation = 0
        self._resubscribing: set[int] = set()
        """Network thread only: SUBSCRIBEs re-sent on this connection, not yet acknowledged."""

    # -- public state ----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the session is connected right now (as last seen by the event loop)."""
        return self._connected

    @property
    def generation(self) -> int:
        """Which connection is up: the counter ``connections()`` yields, as last seen by
        the event loop."""
        return self._generation

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
            reconnect_on_failure=True,
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
        # paho annotates the delays as int but computes with floats; a short first delay
        # matters for tests and for devices on flaky links.
        client.reconnect_delay_set(_RECONNECT_MIN, _RECONNECT_MAX)  # type: ignore[arg-type]
        client.connect_timeout = self._connect_timeout
        # Unlimited client-side queue: publish() callers are bounded by their own timeouts.
        client.max_queued_messages_set(0)
        client.on_connect = self._cb_connect
        client.on_disconnect = self._cb_disconnect
        client.on_connect_fail = self._cb_connect_fail
        client.on_publish = self._cb_publish
        client.on_subscribe = self._cb_subscribe
        client.on_unsubscribe = self._cb_unsubscribe
        client.on_message = self._cb_message
        client.on_socket_open = _no_delay
        return client

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if self._session_expiry:
            # Without this the broker discards the session at disconnect, whatever
            # clean_start says (MQTT 5 default expiry is 0).
            props.SessionExpiryInterval = self._session_expiry
        props.ReceiveMaximum = min(self._incoming_limit, _MAX_RECEIVE)
        return props

    async def __aenter__(self) -> Self:
        """Connect and wait for a successful CONNACK.

        Raises:
            ConnectRefused: the broker refused the connection (credentials, ACL on the Will).
            TransportError: the broker could not be reached, TLS failed, or no CONNACK came
                within ``connect_timeout``.
        """
        if self._client is not None or self._closed:
            msg = "a Session can be entered only once"
            raise RuntimeError(msg)
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._first = loop.create_future()
        client = self._make_client()
        self._client = client
        ep = self._endpoint
        try:
            async with asyncio.timeout(self._connect_timeout):
                # connect() does the TCP connect and TLS handshake synchronously; in a worker
                # thread it cannot block the event loop and its exception keeps the detail
                # (a failure inside loop_start would only surface as "connect failed").
                await asyncio.to_thread(
                    client.connect,
                    ep.host,
                    ep.port,
                    keepalive=self._keepalive,
                    clean_start=self._clean_start,
                    properties=self._connect_properties(),
                )
                client.loop_start()
                await self._first
        except TimeoutError:
            await self._shutdown()
            msg = f"no CONNACK from {ep.host}:{ep.port} within {self._connect_timeout} s"
            raise TransportError(msg) from None
        except TransportError:
            await self._shutdown()
            raise
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            await self._shutdown()
            msg = f"cannot connect to {ep.host}:{ep.port}: {exc}"
            raise TransportError(msg) from exc
        except BaseException:
            await self._shutdown()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Send DISCONNECT and stop the network thread. On a normal exit the broker then
        discards the Will; on an exit by an exception it publishes it (reason code 0x04)."""
        await self._shutdown(with_will=exc_type is not None)

    async def _shutdown(self, *, with_will: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        client = self._client
        if client is not None:
            reason = None
            if with_will:
                reason = ReasonCode(PacketTypes.DISCONNECT, identifier=_DISCONNECT_WITH_WILL)
            with contextlib.suppress(Exception):
                client.disconnect(reasoncode=reason)
            if not await self._stop_thread(client, _STOP_GRACE):
                # The broker is unresponsive: cut the socket so the loop errors out.
                self._cut_socket(client)
                if not await self._stop_thread(client, _STOP_GRACE):
                    _log.warning("paho thread of %s did not stop; abandoned", self._client_id)
                    client = None
            if client is not None:
                # loop_start() opened a socketpair that paho closes only in Client.__del__;
                # when the client dies in a reference cycle the sockets are finalised first
                # and warn (ResourceWarning). No public API closes them, hence the private call.
                client._reset_sockets()
        self._connected = False
        pending: list[asyncio.Future[Any]] = [
            *self._pub_pending.values(),
            *self._req_pending.values(),
        ]
        for fut in pending:
            if not fut.done():
                fut.set_exception(TransportError("session closed"))
                # Mark retrieved: the awaiting coroutine may already be gone.
                fut.exception()
        self._notify_changed()
        self._incoming_event.set()

    async def _stop_thread(self, client: mqtt.Client, grace: float) -> bool:
        """Run the blocking ``loop_stop`` (a join) off the event loop; True once it returned."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def _run() -> None:
            try:
                client.loop_stop()
            finally:
                with contextlib.suppress(RuntimeError):  # loop closed meanwhile
                    loop.call_soon_threadsafe(_resolve, done)

        # A daemon thread, not the default executor: asyncio.run() would wait for an
        # executor thread forever if paho never returned.
        threading.Thread(target=_run, name=f"stop-{self._client_id}", daemon=True).start()
        try:
            async with asyncio.timeout(grace):
                await asyncio.shield(done)
        except TimeoutError:
            return False
        return True

    @staticmethod
    def _cut_socket(client: mqtt.Client) -> None:
        sock = client.socket()
        if sock is None:
            return
        with contextlib.suppress(OSError, ValueError):
            # shutdown() on a dup of the fd ends the connection for every holder of it (the
            # paho thread) without closing paho's descriptor under its feet, and works for
            # TLS and websocket wrappers alike. No DISCONNECT is sent.
            dup = socket.socket(fileno=os.dup(sock.fileno()))
            try:
                dup.shutdown(socket.SHUT_RDWR)
            finally:
                dup.close()

    def drop(self) -> None:
        """Test helper: cut the connection without DISCONNECT, so the broker fires the Will.

        paho then reconnects as after any network failure.
        """
        if self._client is not None:
            self._cut_socket(self._client)

    # -- paho thread -> event loop -----------------------------------------------------

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        # The loop may be closed while paho is still shutting down; nobody is listening then.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(fn, *args)

    def _cb_connect(
        self,
        client: mqtt.Client,
        _userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._post(self._on_refused, reason_code.value, str(reason_code))
            return
        self._thread_generation += 1
        self._resubscribing = set()
        if not flags.session_present:
            # Paho sends nothing on its own after a clean (re)connect: re-subscribe here, in
            # the network thread, before any message of the new connection is processed.
            with self._subs_lock:
                by_qos: dict[int, list[str]] = {}
                for topic_filter, qos in self._subs.items():
                    by_qos.setdefault(qos, []).append(topic_filter)
            for qos, filters in by_qos.items():
                _, mid = client.subscribe([(f, SubscribeOptions(qos=qos)) for f in filters])
                if mid is not None:  # None: not sent, the connection is already going
                    self._resubscribing.add(mid)
        # The connection counts as up once its subscriptions are back: an owner that
        # re-asserts or waits on it must not miss what is published meanwhile.
        if not self._resubscribing:
            self._post(self._on_connected, self._thread_generation)

    def _cb_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        self._post(self._on_disconnected, str(reason_code))

    def _cb_connect_fail(self, _client: mqtt.Client, _userdata: Any) -> None:
        self._post(self._on_disconnected, "connect failed")

    def _cb_publish(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        self._post(self._on_puback, mid, reason_code.value)

    def _cb_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        self._post(self._on_ack, mid, [rc.value for rc in reason_codes])
        if mid in self._resubscribing:
            self._resubscribing.discard(mid)
            if not self._resubscribing:
                self._post(self._on_connected, self._thread_generation)

    def _cb_unsubscribe(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        self._post(self._on_ack, mid, [rc.value for rc in reason_codes])

    def _cb_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        message = Message(
            topic=msg.topic, payload=bytes(msg.payload), retain=msg.retain, qos=msg.qos
        )
        self._post(self._on_message, _Incoming(message, msg.mid, self._thread_generation))

    # -- event loop side of the callbacks -------------------------------------------------

    def _notify_changed(self) -> None:
        # Waiters hold the old event; swapping in a fresh one makes this an edge trigger.
        self._changed.set()
        self._changed = asyncio.Event()

    def _on_connected(self, generation: int) -> None:
        self._connected = True
        self._generation = generation
        if self._first is not None and not self._first.done():
            self._first.set_result(None)
        self._notify_changed()

    def _on_refused(self, code: int, reason: str) -> None:
        if self._first is not None and not self._first.done():
            self._first.set_exception(ConnectRefused(code, reason))
        else:
            _log.warning("%s: reconnect refused: 0x%02x %s", self._client_id, code, reason)

    def _on_disconnected(self, reason: str) -> None:
        was_connected = self._connected
        self._connected = False
        if self._first is not None and not self._first.done():
            self._first.set_exception(TransportError(f"connection closed before CONNACK: {reason}"))
        # A SUBSCRIBE/UNSUBSCRIBE in flight may never be acknowledged now; its caller
        # re-sends after the reconnect. (QoS 1 publishes are re-sent by paho instead.)
        for fut in self._req_pending.values():
            if not fut.done():
                fut.set_result(None)
        if was_connected:
            _log.info("%s: disconnected: %s", self._client_id, reason)
            self._notify_changed()

    def _on_puback(self, mid: int, code: int) -> None:
        fut = self._pub_pending.get(mid)
        if fut is not None and not fut.done():
            fut.set_result(code)

    def _on_ack(self, mid: int, codes: list[int]) -> None:
        fut = self._req_pending.get(mid)
        if fut is not None and not fut.done():
            fut.set_result(codes)

    def _on_message(self, item: _Incoming) -> None:
        if item.message.qos == 0 and len(self._incoming) >= self._incoming_limit:
            self._dropped += 1
        else:
            # QoS > 0 is bounded by the Receive Maximum since we ack only on consumption.
            self._incoming.append(item)
        self._incoming_event.set()

    # -- operations ----------------------------------------------------------------------

    def _require_client(self) -> mqtt.Client:
        if self._client is None or self._closed:
            msg = "session is not open"
            raise RuntimeError(msg)
        return self._client

    async def _wait_connected(self) -> None:
        while not self._connected:
            if self._closed:
                msg = "session closed"
                raise TransportError(msg)
            await self._changed.wait()

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
        if qos == 0:
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                msg = f"publish to {topic!r} failed: {mqtt.error_string(info.rc)}"
                raise TransportError(msg)
            return
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            msg = f"publish to {topic!r} failed: {mqtt.error_string(info.rc)}"
            raise TransportError(msg)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pub_pending[info.mid] = fut
        try:
            async with asyncio.timeout(timeout):
                code = await fut
        except TimeoutError:
            msg = f"publish to {topic!r} not acknowledged within {timeout} s"
            raise TransportError(msg) from None
        finally:
            self._pub_pending.pop(info.mid, None)
        if code >= _FAILURE:
            raise PublishRefused(topic, code)

    async def _request(
        self, send: Callable[[], tuple[MQTTErrorCode, int | None]], what: str, limit: float
    ) -> list[int]:
        """Send SUBSCRIBE/UNSUBSCRIBE until acknowledged on a live connection."""
        try:
            async with asyncio.timeout(limit):
                while True:
                    await self._wait_connected()
                    rc, mid = send()
                    if rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
                        # Raced with a disconnect: wait for the next connection.
                        await self._changed.wait()
                        continue
                    if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                        msg = f"{what} failed: {mqtt.error_string(rc)}"
                        raise TransportError(msg)
                    fut: asyncio.Future[list[int] | None]
                    fut = asyncio.get_running_loop().create_future()
                    self._req_pending[mid] = fut
                    try:
                        codes = await fut
                    finally:
                        self._req_pending.pop(mid, None)
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
        with self._subs_lock:
            for topic_filter in topic_filters:
                self._subs[topic_filter] = qos
        options = [(f, SubscribeOptions(qos=qos)) for f in topic_filters]
        codes = await self._request(
            lambda: client.subscribe(options), f"subscribe {topic_filters}", timeout
        )
        for topic_filter, code in zip(topic_filters, codes, strict=False):
            if code >= _FAILURE:
                with self._subs_lock:
                    self._subs.pop(topic_filter, None)
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
        with self._subs_lock:
            for topic_filter in topic_filters:
                self._subs.pop(topic_filter, None)
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
            if self._dropped:
                dropped, self._dropped = self._dropped, 0
                raise IncomingOverflow(dropped)
            if self._incoming:
                item = self._incoming.popleft()
                self._ack(item)
                return item.message
            if self._closed:
                raise StopAsyncIteration
            self._incoming_event.clear()
            await self._incoming_event.wait()

    def _ack(self, item: _Incoming) -> None:
        client = self._client
        # An id from an earlier connection may now name another message: don't ack it;
        # the broker redelivers an unacked message of a persistent session anyway.
        if (
            item.message.qos > 0
            and client is not None
            and not self._closed
            and item.generation == self._thread_generation
        ):
            client.ack(item.mid, item.message.qos)

    async def _next_connection(self, seen: int) -> int:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._connected and self._generation > seen:
                return self._generation
            await self._changed.wait()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


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
