"""``edgefleet dashboard``'s server: the page, its settings, the audit trail, and the
relay of its MQTT WebSocket to the broker.

HTTP is parsed by h11 (sans-IO) on the event loop, one request per connection; what is
answered is decided by :func:`dashboard.routes.route`. Every cost is bounded: open
connections (past ``max_connections`` a client is told 503 and closed), relayed
WebSockets (``max_relays``), header bytes, the time to send a request, and the audit
entries read per request. No request can end the server: a failure is logged and closes
only its connection.

The page logs in to the broker itself, with a read-only dashboard account of the home,
which ``/config.json`` hands it. The server is meant for loopback: whoever can load the
page can read that account's password (never a writing one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import h11

from coordinator.audit import read_newest
from dashboard.relay import BrokerTarget, open_broker, pipe_both, tls_context, upgrade_request
from dashboard.routes import Refusal, Route, RouteKind, allowed_hosts, load_static, route
from schemas import topics

__all__ = ["DashboardConfig", "DashboardServer"]

log = logging.getLogger(__name__)

_READ_CHUNK: Final = 16 * 1024
_SECURITY_HEADERS: Final = (
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
)


@dataclass(frozen=True, kw_only=True)
class DashboardConfig:
    """Where the page is served, whom it logs in as, and the bounds."""

    broker: BrokerTarget
    username: str
    """A read-only dashboard account of the home."""
    password: str
    host: str = "127.0.0.1"
    port: int = 8886
    """0: any free port (see :attr:`DashboardServer.port`)."""
    audit_path: Path | None = None
    """The coordinator's audit log (``audit.sqlite`` in its data folder), if readable here."""
    audit_entries: int = 300
    """The newest entries one request reads."""
    max_connections: int = 64
    max_relays: int = 16
    """WebSockets relayed at once: open dashboard tabs."""
    max_header_bytes: int = 8 * 1024
    request_timeout_s: float = 10.0
    connect_timeout_s: float = 10.0
    """How long a relay waits for the broker's TLS session."""

    def __post_init__(self) -> None:
        bounds = (self.audit_entries, self.max_connections, self.max_relays, self.max_header_bytes)
        if min(bounds) < 1 or min(self.request_timeout_s, self.connect_timeout_s) <= 0:
            msg = "dashboard limits must be positive"
            raise ValueError(msg)


class DashboardServer:
    """Serves the dashboard until cancelled."""

    def __init__(self, config: DashboardConfig) -> None:
        self._config = config
        self._files = load_static()
        self._tls = tls_context(config.broker)
        self._open = 0
        self._relays = 0
        self._hosts: frozenset[str] = frozenset()
        self.port: int | None = None
        """The TCP port bound, once serving."""
        self.serving = asyncio.Event()

    @property
    def public(self) -> bool:
        """Served beyond loopback."""
        return f"localhost:{self.port}" not in self._hosts

    @property
    def url(self) -> str:
        host = self._config.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/"

    async def run(self) -> None:
        """Listen and serve until cancelled.

        Raises:
            OSError: the address cannot be bound.
        """
        config = self._config
        server = await asyncio.start_server(self._connection, config.host, config.port)
        self.port = server.sockets[0].getsockname()[1]
        self._hosts = allowed_hosts(config.host, self.port)
        log.info("dashboard on %s", self.url)
        try:
            async with server:
                self.serving.set()
                await server.serve_forever()
        finally:
            self.serving.clear()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._config.max_header_bytes)
        try:
            if self._open >= self._config.max_connections:
                await _refuse_unread(writer)
                return
            self._open += 1
            try:
                await self._serve(conn, reader, writer)
            finally:
                self._open -= 1
        except (ConnectionError, TimeoutError, h11.ProtocolError):
            pass  # the client went away, stalled or broke HTTP: only its connection ends
        except Exception:  # the point: no request ends the server
            log.exception("dashboard: connection failed")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _serve(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        async with asyncio.timeout(self._config.request_timeout_s):
            request = await _read_request(conn, reader)
        if request is None:
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
        try:
            chosen = route(
                request.method.decode("ascii", "replace"),
                request.target.decode("latin-1"),
                headers,
                hosts=self._hosts,
                files=self._files,
            )
            if chosen.kind is RouteKind.RELAY:
                await self._relay(conn, reader, writer, headers)
                return
            status, body = 200, await self._body(chosen)
        except Refusal as refusal:
            status, body = refusal.status, _error(refusal.message)
        await _answer(conn, writer, status, body)

    async def _body(self, chosen: Route) -> tuple[str, bytes]:
        """The content type and body of a route that is not the relay."""
        config = self._config
        if chosen.kind is RouteKind.FILE:
            file = self._files[chosen.path]
            return file.content_type, file.body
        if chosen.kind is RouteKind.CONFIG:
            settings = {
                "username": config.username,
                "password": config.password,
                "prefix": topics.PREFIX,
                "audit": config.audit_path is not None,
            }
            return _json(settings)
        if config.audit_path is None:
            return _json({"entries": [], "note": "no audit log here: start with --data"})
        try:
            entries = await asyncio.to_thread(
                read_newest, config.audit_path, config.audit_entries, chosen.rollout
            )
        except (OSError, sqlite3.Error) as exc:
            # Not there yet (no coordinator ran here), or not a log: said, not an error.
            return _json({"entries": [], "note": f"audit log unreadable: {exc}"[:300]})
        return _json({"entries": entries})

    async def _relay(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        headers: dict[str, str],
    ) -> None:
        """Relay the page's WebSocket to the broker, or say why not.

        Raises:
            Refusal: 503 when ``max_relays`` are open, 400 for a malformed upgrade,
                502 when the broker cannot be reached over TLS.
        """
        config = self._config
        if self._relays >= config.max_relays:
            raise Refusal(503, "too many dashboards open")
        request = upgrade_request(headers, config.broker)
        try:
            broker = await open_broker(config.broker, self._tls, timeout=config.connect_timeout_s)
        except (OSError, TimeoutError) as exc:
            log.warning("dashboard: broker %s:%s: %s", config.broker.host, config.broker.port, exc)
            raise Refusal(502, "the broker cannot be reached") from None
        self._relays += 1
        try:
            early, _ = conn.trailing_data
            broker[1].write(request + bytes(early))
            await pipe_both((reader, writer), broker)
        finally:
            self._relays -= 1


async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Request | None:
    """The request's head (its body, if any, is not read: every route is a GET).

    Raises:
        h11.RemoteProtocolError: broken HTTP, or a head over the limit.
    """
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(_READ_CHUNK))
        elif isinstance(event, h11.Request):
            return event
        else:
            return None


async def _refuse_unread(writer: asyncio.StreamWriter) -> None:
    """Answer 503 to a connection refused before its request is read (h11 answers only
    requests it has read)."""
    _, body = _error("too many connections")
    head = ["HTTP/1.1 503 Service Unavailable", "content-type: application/json"]
    head += [f"content-length: {len(body)}", "connection: close", "", ""]
    writer.write("\r\n".join(head).encode() + body)
    await writer.drain()


def _json(document: dict[str, Any]) -> tuple[str, bytes]:
    return "application/json", json.dumps(document, separators=(",", ":")).encode()


def _error(message: str) -> tuple[str, bytes]:
    return _json({"error": message})


async def _answer(
    conn: h11.Connection, writer: asyncio.StreamWriter, status: int, body: tuple[str, bytes]
) -> None:
    content_type, data = body
    headers = [
        ("content-type", content_type),
        ("content-length", str(len(data))),
        ("cache-control", "no-store"),
        ("connection", "close"),
        *_SECURITY_HEADERS,
    ]
    if content_type.startswith("text/html"):
        headers.append(("content-security-policy", _CSP))
    with contextlib.suppress(h11.LocalProtocolError):
        writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
        writer.write(conn.send(h11.Data(data=data)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()


_CSP: Final = (
    "default-src 'none'; script-src 'self'; worker-src blob:; style-src 'self'; "
    "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
"""The page loads only its own files and talks only to its own server (``'self'``
covers the ``ws://`` of the same host and port). MQTT.js runs its keep-alive timer in a
worker it makes from a blob, which background tabs do not throttle."""
