"""The page's MQTT WebSocket, relayed byte for byte to the broker's secure WebSockets
listener.

Why a relay: that listener speaks TLS with a certificate of the fleet's own CA, which no
browser trusts, and an operator should not have to add a private CA to a browser (or
click through a warning) to read a dashboard. So the page opens a plain ``ws://`` to the
dashboard's server on loopback, and the relay opens TLS to the broker, checking its
certificate against the home's CA. It forwards the upgrade request (the WebSocket
headers only, path ``/mqtt``) and then copies bytes both ways unchanged: the WebSocket
frames, and the MQTT inside them with the account's login, are the page's and the
broker's own. TLS, the login and the ACL stay on the broker; the relay adds no rights.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from dashboard.routes import Refusal

__all__ = ["BrokerTarget", "open_broker", "pipe_both", "tls_context", "upgrade_request"]

_KEY: Final = re.compile(r"[A-Za-z0-9+/]{22}==")
"""A Sec-WebSocket-Key: 16 random bytes in base64."""
_PROTOCOLS: Final = re.compile(r"[A-Za-z0-9.]{1,16}(, ?[A-Za-z0-9.]{1,16}){0,3}")
_CHUNK: Final = 64 * 1024
_CLOSE_S: Final = 2.0


@dataclass(frozen=True, kw_only=True)
class BrokerTarget:
    """The broker's secure WebSockets listener, and the CA its certificate must chain to."""

    host: str
    port: int
    ca_file: Path


def tls_context(target: BrokerTarget) -> ssl.SSLContext:
    """A client context that trusts the home's CA alone and checks the broker's name.

    Raises:
        OSError: the CA file cannot be read; ssl.SSLError: it holds no certificate.
    """
    context = ssl.create_default_context(cafile=str(target.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def upgrade_request(headers: Mapping[str, str], target: BrokerTarget) -> bytes:
    """The upgrade request for the broker, from the page's (lower-case ``headers``):
    its key, version and subprotocols, nothing else of the browser's (no cookies).

    Raises:
        Refusal: 400 when the key, version or subprotocols are malformed.
    """
    key = headers.get("sec-websocket-key", "")
    if not _KEY.fullmatch(key):
        raise Refusal(400, "malformed Sec-WebSocket-Key")
    if headers.get("sec-websocket-version") != "13":
        raise Refusal(400, "WebSocket version 13 only")
    protocols = headers.get("sec-websocket-protocol", "")
    if protocols and not _PROTOCOLS.fullmatch(protocols):
        raise Refusal(400, "malformed Sec-WebSocket-Protocol")
    host = f"[{target.host}]" if ":" in target.host else target.host
    lines = [
        "GET /mqtt HTTP/1.1",
        f"Host: {host}:{target.port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if protocols:
        lines.append(f"Sec-WebSocket-Protocol: {protocols}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


async def open_broker(
    target: BrokerTarget, context: ssl.SSLContext, *, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to the broker's listener over TLS.

    Raises:
        OSError: refused or unreachable, or its certificate does not check out
            (``ssl.SSLError``); TimeoutError: no TLS session within ``timeout``.
    """
    async with asyncio.timeout(timeout):
        return await asyncio.open_connection(
            target.host, target.port, ssl=context, server_hostname=target.host
        )


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(_CHUNK):
        writer.write(data)
        await writer.drain()  # a slow reader holds the sender back: memory stays bounded


async def pipe_both(
    one: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    other: tuple[asyncio.StreamReader, asyncio.StreamWriter],
) -> None:
    """Copy bytes both ways until either side closes or fails; then close both."""
    tasks = (
        asyncio.create_task(_pipe(one[0], other[1])),
        asyncio.create_task(_pipe(other[0], one[1])),
    )
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task
        for _, writer in (one, other):
            await _close(writer)


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close a side and wait until it is closed (a TLS side says goodbye first), at most
    ``_CLOSE_S``: past it the connection is dropped."""
    writer.close()
    try:
        async with asyncio.timeout(_CLOSE_S):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
    except OSError:
        pass  # the peer was gone already: closed is what we wanted
