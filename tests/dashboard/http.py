"""A bare HTTP/1.1 client for the dashboard server's tests (h11 over asyncio streams):
what a browser sends, including WebSocket upgrades, and what comes back."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import h11

WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def upgrade_headers(port: int, *, origin: str | None = None) -> dict[str, str]:
    """What a page of the dashboard sends to open its MQTT WebSocket."""
    return {
        "host": f"127.0.0.1:{port}",
        "upgrade": "websocket",
        "connection": "Upgrade",
        "origin": origin or f"http://127.0.0.1:{port}",
        "sec-websocket-key": base64.b64encode(os.urandom(16)).decode(),
        "sec-websocket-version": "13",
        "sec-websocket-protocol": "mqtt",
    }


def accept_for(key: str) -> str:
    """The Sec-WebSocket-Accept a WebSocket server answers ``key`` with (RFC 6455)."""
    return base64.b64encode(hashlib.sha1(key.encode() + WEBSOCKET_GUID).digest()).decode()


@contextlib.asynccontextmanager
async def connection(
    port: int,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def request(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    target: str,
    headers: dict[str, str],
) -> Answer:
    """Send a GET and read the answer's head, and its body unless it switched protocols."""
    conn = h11.Connection(h11.CLIENT)
    writer.write(conn.send(h11.Request(method="GET", target=target, headers=list(headers.items()))))
    writer.write(conn.send(h11.EndOfMessage()))
    await writer.drain()
    answer: Answer | None = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
        elif isinstance(event, h11.InformationalResponse | h11.Response):
            found = {k.decode(): v.decode() for k, v in event.headers}
            answer = Answer(event.status_code, found, b"")
            if event.status_code == 101:
                return answer
        elif isinstance(event, h11.Data) and answer is not None:
            answer.body += event.data
        elif answer is not None:
            return answer
        else:
            msg = f"no answer: {event!r}"
            raise AssertionError(msg)


async def get(port: int, target: str, **headers: str) -> Answer:
    async with connection(port) as (reader, writer):
        return await request(reader, writer, target, {"host": f"127.0.0.1:{port}", **headers})
