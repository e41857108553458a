"""One paho-mqtt client driven from the asyncio event loop: the only module importing paho.

paho is driven through its socket callbacks, as its own asyncio example and aiomqtt do:
no network thread per connection and no ``select()`` (which fails for descriptors
numbered 1024 and above), so one process holds thousands of connections. The socket is
watched with ``add_reader`` (paho's ``loop_read``) and, while paho has bytes to send,
``add_writer`` (``loop_write``); :meth:`PahoDriver.serve` calls ``loop_misc`` about once a
second for keepalive pings and timeouts. Every paho callback therefore runs on the event
loop thread and is handed on, decoded, to the owner's :class:`DriverEvents`.

Opening a connection (TCP connect, TLS handshake, websocket upgrade: all blocking in paho's
``reconnect()``) runs in a short-lived thread that ends with it; a gate lets at most
``_OPENING_AT_ONCE`` of them run per event loop and queues the rest, so the connect
timeout starts only when the work does. Not the loop's default executor: other blocking
work (inference, hashing) may fill it. paho's CONNECT is then written by the loop. Every
socket sends with ``TCP_NODELAY``.

The driver keeps one connection at a time and never reconnects by itself: that is the
owner's (:class:`broker.session.Session`) decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import ssl
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from broker.transport import ConnectRefused, Endpoint, Message, TransportError, Will

__all__ = ["DriverEvents", "PahoDriver"]

_MISC_EVERY = 1.0  # at most this many seconds between loop_misc calls (pings, timeouts)
_MAX_RECEIVE = 65535
_CUT_READS = 64  # reads after a cut before leaving the end to the reader callback
_DISCONNECT_WITH_WILL = 0x04
_OPENING_AT_ONCE = 8  # connections being opened at once (one thread each), per event loop
_READS_AT_ONCE = 64  # packets read per wake-up of the reader at most, while more are there


_gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore]
_gates = weakref.WeakKeyDictionary()


def _readable(sock: Any) -> bool:
    """Whether ``sock`` holds bytes to read now (in its TLS buffer or the kernel's); a
    zero-timeout poll, not ``select()`` (descriptors above 1024)."""
    if getattr(sock, "pending", int)() > 0:
        return True
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def _opening_gate() -> asyncio.Semaphore:
    """How many connections of this event loop are being opened at once."""
    loop = asyncio.get_running_loop()
    gate = _gates.get(loop)
    if gate is None:
        gate = _gates[loop] = asyncio.Semaphore(_OPENING_AT_ONCE)
    return gate


def _open_in_thread(client: mqtt.Client) -> asyncio.Future[MQTTErrorCode]:
    """Run ``reconnect()`` in a thread of its own that ends with it: nothing lingers once
    the connections are open, and nothing waits behind other blocking work of the loop."""
    loop = asyncio.get_running_loop()
    opening: asyncio.Future[MQTTErrorCode] = loop.create_future()

    def deliver(result: MQTTErrorCode | None, error: BaseException | None) -> None:
        if opening.done():
            return
        if error is None and result is not None:
            opening.set_result(result)
        else:
            opening.set_exception(error or TransportError("reconnect() returned nothing"))

    def run() -> None:
        result, error = None, None
        try:
            result = _reconnect(client)
        except Exception as exc:  # noqa: BLE001 (handed to the awaiting coroutine)
            error = exc
        try:
            loop.call_soon_threadsafe(deliver, result, error)
        except RuntimeError:  # the loop closed meanwhile: nobody will use this socket
            sock = client.socket()
            if sock is not None:
                sock.close()

    threading.Thread(target=run, name="mqtt-open", daemon=True).start()
    return opening


def _on_dup(sock: Any, act: Callable[[socket.socket], None]) -> None:
    """Act on the TCP socket under ``sock`` (plain, TLS or websocket wrapper) through a dup
    of its descriptor, which reaches every holder without closing theirs."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        dup = socket.socket(fileno=os.dup(sock.fileno()))
        try:
            act(dup)
        finally:
            dup.close()


def _no_delay(_client: mqtt.Client, _userdata: object, sock: Any) -> None:
    """MQTT packets are small (a PUBACK, a presence): they must not wait for Nagle and the
    peer's delayed ACK (tens of ms per publish). Called by paho on every new socket."""
    _on_dup(sock, lambda s: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1))


def _reconnect(client: mqtt.Client) -> MQTTErrorCode:
    """paho's ``reconnect()``, closing the socket of a failed connect or handshake: paho
    drops it unclosed (a ResourceWarning when the collector finds it)."""
    try:
        return client.reconnect()
    except BaseException as exc:
        tb = exc.__traceback__
        while tb is not None:
            for value in tb.tb_frame.f_locals.values():
                if isinstance(value, socket.socket):
                    value.close()
            tb = tb.tb_next
        raise


@dataclass(frozen=True)
class DriverEvents:
    """What the owner is told, on the event loop thread."""

    accepted: Callable[[bool], None]
    """A CONNACK accepted the connection (argument: session present)."""
    refused: Callable[[ConnectRefused], None]
    puback: Callable[[int, int], None]
    """A PUBACK: packet id, reason code."""
    suback: Callable[[int, list[int]], None]
    unsuback: Callable[[int, list[int]], None]
    message: Callable[[Message, int], None]
    """A PUBLISH and its packet id (to acknowledge when consumed)."""
    lost: Callable[[str], None]
    """The socket closed; paho's reason."""


class PahoDriver:
    """One paho client (MQTT v5, TLS, manual acks) whose I/O the event loop carries out."""

    def __init__(
        self,
        endpoint: Endpoint,
        events: DriverEvents,
        *,
        client_id: str,
        clean_start: bool,
        session_expiry: int,
        will: Will | None,
        keepalive: int,
        connect_timeout: float,
        receive_maximum: int,
    ) -> None:
        self._endpoint = endpoint
        self._events = events
        self._connect_timeout = connect_timeout
        # A PINGREQ leaves at the first tick after ``keepalive`` idle seconds, and the broker
        # waits 1.5 keepalives: ticks a quarter keepalive apart keep a short one alive too.
        self._misc_every = min(_MISC_EVERY, keepalive / 4)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: Any = None  # the socket registered with the loop
        self._opening: asyncio.Future[MQTTErrorCode] | None = None  # reconnect() in the pool
        self._closed = asyncio.Event()  # the registered socket closed
        self._why = "unknown"
        self._client = client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            transport=endpoint.transport,
            manual_ack=True,
        )
        client.tls_set(
            ca_certs=str(endpoint.ca_file),
            certfile=None if endpoint.cert_file is None else str(endpoint.cert_file),
            keyfile=None if endpoint.key_file is None else str(endpoint.key_file),
            cert_reqs=ssl.CERT_REQUIRED,
        )
        if endpoint.username is not None:
            client.username_pw_set(endpoint.username, endpoint.password)
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        client.connect_timeout = connect_timeout
        # Unlimited client-side queue: publish() callers are bounded by their own timeouts.
        client.max_queued_messages_set(0)
        self._hook(client)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if session_expiry:
            # Without this the broker discards the session at disconnect, whatever
            # clean_start says (MQTT 5 default expiry is 0).
            props.SessionExpiryInterval = session_expiry
        props.ReceiveMaximum = min(receive_maximum, _MAX_RECEIVE)
        client.connect_async(
            endpoint.host,
            endpoint.port,
            keepalive=keepalive,
            clean_start=clean_start,
            properties=props,
        )

    def _hook(self, client: mqtt.Client) -> None:
        ev = self._events
        client.on_socket_open = _no_delay
        client.on_socket_close = self._socket_closed
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._done_writing
        client.on_disconnect = self._disconnected

        def connect(_c: Any, _u: Any, flags: Any, rc: ReasonCode, _p: Any) -> None:
            if rc.is_failure:
                ev.refused(ConnectRefused(rc.value, str(rc)))
            else:
                ev.accepted(bool(flags.session_present))

        def message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
            payload = bytes(msg.payload)
            ev.message(
                Message(topic=msg.topic, payload=payload, retain=msg.retain, qos=msg.qos), msg.mid
            )

        client.on_connect = connect
        client.on_message = message
        client.on_publish = lambda _c, _u, mid, rc, _p: ev.puback(mid, rc.value)
        client.on_subscribe = lambda _c, _u, mid, rcs, _p: ev.suback(mid, [r.value for r in rcs])
        client.on_unsubscribe = lambda _c, _u, mid, rcs, _p: ev.unsuback(
            mid, [r.value for r in rcs]
        )

    def socket(self) -> Any:
        """The socket of the current connection, or None (for tests and diagnostics)."""
        return self._client.socket()

    # -- one connection ------------------------------------------------------------------

    async def open(self) -> float:
        """Open a connection and send CONNECT; returns the loop time by which its CONNACK
        is due. The answer comes as ``accepted``/``refused``, a failure as ``lost``.

        Raises:
            TransportError: the broker could not be reached, TLS failed, or it took longer
                than ``connect_timeout``.
        """
        loop = self._loop = asyncio.get_running_loop()
        await self.settle()
        self._closed = asyncio.Event()
        self._why = "unknown"
        ep = self._endpoint
        async with _opening_gate():
            deadline = loop.time() + self._connect_timeout
            # Not cancelled with the caller: _opened() ends a socket that came too late.
            opening = self._opening = _open_in_thread(self._client)
            claimed = [True]
            opening.add_done_callback(lambda done: self._opened(done, claimed))
            try:
                async with asyncio.timeout_at(deadline):
                    await asyncio.shield(opening)
            except TimeoutError:
                msg = f"cannot connect to {ep.host}:{ep.port} within {self._connect_timeout} s"
                raise TransportError(msg) from None
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                msg = f"cannot connect to {ep.host}:{ep.port}: {exc}"
                raise TransportError(msg) from exc
            finally:
                if not opening.done():
                    claimed[0] = False
        return deadline

    async def settle(self) -> None:
        """Wait for a ``reconnect()`` still running in the pool (bounded by paho's socket
        timeouts): two at once would share the client's state."""
        if self._opening is not None and not self._opening.done():
            await asyncio.wait([self._opening])

    def _opened(self, opening: asyncio.Future[MQTTErrorCode], claimed: list[bool]) -> None:
        """On the loop once paho opened a socket: watch it, or, if nobody waits for it any
        more, end it unseen (its CONNECT was never written, and no loss is reported)."""
        if opening.cancelled() or opening.exception() is not None:
            return
        sock = self._client.socket()
        if sock is None or self._loop is None:
            return
        if not claimed[0]:
            _on_dup(sock, lambda s: s.shutdown(socket.SHUT_RDWR))
            for _ in range(_CUT_READS):
                if self._client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    return
            return
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._read)
        if self._client.want_write():
            self._loop.add_writer(sock.fileno(), self._write)

    async def serve(self) -> str:
        """Call ``loop_misc`` about once a second (pings, keepalive; more often for a
        keepalive under 4 s) until the socket closes; returns paho's reason."""
        closed = self._closed
        while not closed.is_set():
            try:
                async with asyncio.timeout(self._misc_every):
                    await closed.wait()
            except TimeoutError:
                self._client.loop_misc()
        return self._why

    async def close(self, *, with_will: bool, grace: float) -> None:
        """Send DISCONNECT (reason 0x04 ``with_will``: the broker publishes the Will) and
        wait up to ``grace`` for paho to close the socket; then cut it. A socket still
        being opened is cut when it comes (:meth:`_opened`)."""
        if self._sock is not None and self._client.is_connected():
            reason = None
            if with_will:
                reason = ReasonCode(PacketTypes.DISCONNECT, identifier=_DISCONNECT_WITH_WILL)
            self._client.disconnect(reasoncode=reason)  # paho closes the socket once sent
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._closed.wait()
        self.cut()

    def cut(self) -> None:
        """End the connection as a network failure would: shut the socket down and let
        paho read the end, close the socket and report it lost. No DISCONNECT."""
        if self._sock is None:
            return
        _on_dup(self._sock, lambda s: s.shutdown(socket.SHUT_RDWR))
        for _ in range(_CUT_READS):  # buffered packets first, then the end
            if self._sock is None or self._client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return

    # -- the event loop drives paho ----------------------------------------------------

    def _read(self) -> None:
        # paho reads one packet per loop_read (more only while publishes of ours are in
        # flight): read on while the socket holds more, so a burst costs the loop one
        # wake-up per _READS_AT_ONCE packets, and its consumer can take them as a batch.
        for _ in range(_READS_AT_ONCE):
            self._client.loop_read()
            if (sock := self._sock) is None or not _readable(sock):
                break
        # A TLS record may hold more than paho read: bytes the descriptor no longer signals.
        while (sock := self._sock) is not None and getattr(sock, "pending", int)() > 0:
            self._client.loop_read()

    def _write(self) -> None:
        self._client.loop_write()

    def _want_write(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        # Also called from the pool inside reconnect(): _opened() registers that socket.
        if sock is self._sock and self._loop is not None:
            self._loop.add_writer(sock.fileno(), self._write)

    def _done_writing(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        if sock is self._sock and self._loop is not None:
            self._loop.remove_writer(sock.fileno())

    def _socket_closed(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        if sock is not self._sock or self._loop is None:
            return
        self._loop.remove_reader(sock.fileno())
        self._loop.remove_writer(sock.fileno())
        self._sock = None
        # paho reports why right after this callback: tell the owner once it did.
        self._loop.call_soon(self._report_lost)

    def _disconnected(self, _c: Any, _u: Any, _flags: Any, reason: ReasonCode, _p: Any) -> None:
        self._why = str(reason)

    def _report_lost(self) -> None:
        self._closed.set()
        self._events.lost(self._why)

    # -- requests --------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> int:
        """Hand a PUBLISH to paho; returns its packet id. QoS 1 waits in paho's queue
        while disconnected and is resent after a reconnect.

        Raises:
            TransportError: paho could not take it (QoS 0 while disconnected, ...).
            ValueError: invalid topic or QoS.
        """
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        queued = qos > 0 and info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS and not queued:
            msg = f"publish to {topic!r} failed: {mqtt.error_string(info.rc)}"
            raise TransportError(msg)
        return info.mid

    def subscribe(self, topic_filters: Sequence[str], qos: int) -> int | None:
        """Send SUBSCRIBE; its packet id, or None when not connected.

        Raises:
            TransportError: paho could not send it.
        """
        options = [(f, SubscribeOptions(qos=qos)) for f in topic_filters]
        return self._sent(*self._client.subscribe(options), what="subscribe")

    def unsubscribe(self, topic_filters: Sequence[str]) -> int | None:
        """Send UNSUBSCRIBE; its packet id, or None when not connected.

        Raises:
            TransportError: paho could not send it.
        """
        return self._sent(*self._client.unsubscribe(list(topic_filters)), what="unsubscribe")

    @staticmethod
    def _sent(rc: MQTTErrorCode, mid: int | None, *, what: str) -> int | None:
        if rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            return None
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            msg = f"{what} failed: {mqtt.error_string(rc)}"
            raise TransportError(msg)
        return mid

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge an incoming message on the current connection."""
        self._client.ack(mid, qos)
