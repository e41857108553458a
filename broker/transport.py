"""What a party needs of its link to the broker: the :class:`Transport` protocol, the
value objects it speaks in, and the errors it raises.

:class:`broker.session.Session` satisfies :class:`Transport` over paho-mqtt. Services are
written against the protocol, so their engines and fetchers can be driven in tests by
anything that speaks it, with no broker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

__all__ = [
    "ConnectRefused",
    "Endpoint",
    "IncomingOverflow",
    "Message",
    "PublishRefused",
    "SubscribeRefused",
    "Transport",
    "TransportError",
    "Will",
    "listen_address",
]


# -- value objects ------------------------------------------------------------------------


def listen_address(address: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """The host and port of ``PORT``, ``HOST:PORT`` or ``[IPv6]:PORT`` (``default_host``
    when none is given): where a local endpoint listens.

    Raises:
        ValueError: not such an address, or a port over 65535.
    """
    host, _, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]") or default_host
    bad_host = len(host) > 253 or any(c.isspace() or c in "/[]" for c in host)
    if not port.isdigit() or len(port) > 5 or bad_host:
        msg = f"{address[:80]!r} is not PORT, HOST:PORT or [IPv6]:PORT"
        raise ValueError(msg)
    if int(port) > 65535:
        msg = f"port {port} is over 65535"
        raise ValueError(msg)
    return host, int(port)


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    """Where and how to connect. Mutual TLS when ``cert_file``/``key_file`` are given."""

    host: str
    port: int
    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = None
    transport: Literal["tcp", "websockets"] = "tcp"


@dataclass(frozen=True, kw_only=True)
class Will:
    """Last Will, published by the broker when the connection ends without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, kw_only=True)
class Message:
    """An incoming PUBLISH."""

    topic: str
    payload: bytes
    retain: bool
    qos: int


# -- errors -------------------------------------------------------------------------------


class TransportError(Exception):
    """The broker could not be reached or the session failed; wraps paho/socket errors."""


class ConnectRefused(TransportError):  # noqa: N818 (names of the API contract)
    """The broker answered CONNECT with a failure reason code (e.g. 0x86 bad credentials)."""

    def __init__(self, reason_code: int, reason: str = "") -> None:
        super().__init__(f"connection refused: 0x{reason_code:02x} {reason}".rstrip())
        self.reason_code = reason_code


class PublishRefused(TransportError):  # noqa: N818 (names of the API contract)
    """The broker answered PUBLISH with a failure reason code (e.g. 0x87 not authorized)."""

    def __init__(self, topic: str, reason_code: int) -> None:
        super().__init__(f"publish to {topic!r} refused: 0x{reason_code:02x}")
        self.topic = topic
        self.reason_code = reason_code


class SubscribeRefused(TransportError):  # noqa: N818 (names of the API contract)
    """The broker answered SUBSCRIBE with a failure reason code for ``topic_filter``."""

    def __init__(self, topic_filter: str, reason_code: int) -> None:
        super().__init__(f"subscription to {topic_filter!r} refused: 0x{reason_code:02x}")
        self.topic_filter = topic_filter
        self.reason_code = reason_code


class IncomingOverflow(TransportError):  # noqa: N818 (names of the API contract)
    """QoS 0 messages were dropped because the consumer fell ``incoming_limit`` behind."""

    def __init__(self, dropped: int) -> None:
        super().__init__(f"{dropped} QoS 0 message(s) dropped: consumer too slow")
        self.dropped = dropped


# -- the protocol -------------------------------------------------------------------------


class Transport(Protocol):
    """One MQTT v5 link as the services use it (see :class:`broker.session.Session`)."""

    @property
    def connected(self) -> bool:
        """Whether the link is up right now."""
        ...

    @property
    def generation(self) -> int:
        """Which connection is up: the counter :meth:`connections` yields."""
        ...

    @property
    def client_id(self) -> str:
        """The MQTT client id (the account or the device's certificate CN)."""
        ...

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout: float = 30.0,
    ) -> None:
        """Publish; for QoS 1, return once the broker acknowledged it.

        Raises:
            PublishRefused: the broker refused it (e.g. 0x87, the ACL).
            TransportError: not acknowledged within ``timeout``, or the link closed.
        """
        ...

    async def subscribe(self, *topic_filters: str, qos: int = 1, timeout: float = 30.0) -> None:
        """Subscribe (kept across reconnects) and wait for the SUBACK.

        Raises:
            SubscribeRefused: a filter was refused.
            TransportError: not acknowledged within ``timeout``, or the link closed.
        """
        ...

    async def unsubscribe(self, *topic_filters: str, timeout: float = 30.0) -> None:
        """Unsubscribe and wait for the UNSUBACK.

        Raises:
            TransportError: not acknowledged within ``timeout``, or the link closed.
        """
        ...

    def messages(self) -> AsyncIterator[Message]:
        """Incoming messages, one consumer; QoS 1 acknowledged as they are taken."""
        ...

    def take_waiting(self, limit: int) -> list[Message]:
        """Up to ``limit`` messages that already arrived, in order, without waiting: for
        the consumer of :meth:`messages` to take a burst at once, between two of its
        steps (QoS 1 acknowledged as taken). A drop is left for the iterator to raise."""
        ...

    def connections(self) -> AsyncIterator[int]:
        """A counter once per (re)connect whose subscriptions are in place."""
        ...
