"""The device's local inference endpoint: the Open Inference Protocol (KServe v2 REST).

Applications on the device reach the model the fleet rolled out over HTTP/1.1 on
localhost or a Unix socket, with any v2 client. HTTP is parsed by h11 (sans-IO) on the
event loop; the protocol is :mod:`agent.oip`; every inference goes through
:class:`agent.inference.Inference`, so it is counted, soaked and summarised like the
device's own inputs. The answer names the release that gave it (``model_version`` and
``parameters.release``).

Every cost is bounded: connections (past ``max_connections`` a client is told 503 and
closed), header and body bytes (413), the time to send a request (idle and slow clients
are closed), inferences waiting (503). No request can end the agent: a failure in one
connection is logged and closes only that connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Final

import h11

from agent.inference import Inference, InferenceFailedError, NotReadyError, OverloadedError
from agent.oip import (
    HEADER_LENGTH,
    Answer,
    HttpError,
    Route,
    RouteKind,
    decode_infer,
    encode_infer,
    json_answer,
    model_metadata,
    route,
)
from agent.runtime import InvalidInputError
from schemas import Release

__all__ = ["InferenceServer", "ServeConfig"]

log = logging.getLogger(__name__)

_OFFLOAD_BYTES: Final = 256 * 1024
"""Request bodies above this are decoded in a thread, off the event loop."""
_READ_CHUNK: Final = 64 * 1024
_CLOSE: Final = ("connection", "close")


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """Where and how the endpoint serves; bounded by default."""

    host: str = "127.0.0.1"
    port: int = 8000
    """TCP port on ``host`` (0: any free port, see :attr:`InferenceServer.port`)."""
    unix_path: Path | None = None
    """Serve on this Unix socket instead of TCP."""
    model_name: str | None = None
    """The name applications ask for, whatever release serves; None: the hardware
    class. The serving release's own name is accepted too."""
    max_request_bytes: int = 16 * 1024 * 1024
    max_header_bytes: int = 16 * 1024
    max_connections: int = 64
    idle_timeout_s: float = 30.0
    """How long a connection may take to send a request (or sit idle between them)."""

    def __post_init__(self) -> None:
        if min(self.max_request_bytes, self.max_header_bytes, self.max_connections) < 1:
            msg = "serve limits must be positive"
            raise ValueError(msg)


def _version() -> str:
    try:
        return metadata.version("edgefleet")
    except metadata.PackageNotFoundError:
        return "unknown"


class InferenceServer:
    """Serves :class:`Inference` over the Open Inference Protocol until cancelled."""

    def __init__(self, config: ServeConfig, inference: Inference, *, hw_class: str) -> None:
        self._config = config
        self._inference = inference
        self.model_name = config.model_name or hw_class
        self._open = 0
        self._version = _version()
        self.port: int | None = None
        """The TCP port bound, once serving (None on a Unix socket)."""
        self.serving = asyncio.Event()

    async def run(self) -> None:
        """Listen and serve until cancelled.

        Raises:
            OSError: the address cannot be bound (the agent's supervisor retries).
        """
        config = self._config
        limit = config.max_header_bytes + _READ_CHUNK
        if config.unix_path is not None:
            _clear_stale_socket(config.unix_path)
            server = await asyncio.start_unix_server(
                self._connection, path=config.unix_path, limit=limit
            )
        else:
            server = await asyncio.start_server(
                self._connection, config.host, config.port, limit=limit
            )
            self.port = server.sockets[0].getsockname()[1]
        log.info("inference endpoint on %s", config.unix_path or f"{config.host}:{self.port}")
        try:
            async with server:
                self.serving.set()
                await server.serve_forever()
        finally:
            self.serving.clear()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self._open >= self._config.max_connections:
                await _send_once(writer, json_answer(503, {"error": "too many connections"}))
                return
            self._open += 1
            try:
                await self._serve(reader, writer)
            finally:
                self._open -= 1
        except (ConnectionError, TimeoutError, h11.ProtocolError):
            pass  # the client went away, stalled or broke HTTP: only its connection ends
        except Exception:  # the point: no request ends the agent
            log.exception("inference endpoint: connection failed")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._config.max_header_bytes)
        while True:
            try:
                async with asyncio.timeout(self._config.idle_timeout_s):
                    request, body = await self._read(conn, reader, writer)
            except HttpError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # else nothing can be said
                    answer = json_answer(exc.status, {"error": exc.message})
                    closing = Answer(answer.status, answer.body, (*answer.headers, _CLOSE))
                    with contextlib.suppress(h11.LocalProtocolError):
                        await _send(conn, writer, closing)
                return
            if request is None:
                return
            answer = await self._answer(request, body)
            await _send(conn, writer, answer)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # a request that must close, or a body we did not read
            conn.start_next_cycle()

    async def _read(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[h11.Request | None, bytes]:
        """The next request and its whole body; (None, b"") when the client closed.

        Raises:
            HttpError: 413 for a body over the limit, 400 for broken HTTP.
        """
        request: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise HttpError(exc.error_status_hint, f"bad HTTP: {exc}") from None
            if event is h11.NEED_DATA:
                data = await reader.read(_READ_CHUNK)
                conn.receive_data(data)
                if not data and conn.their_state is h11.IDLE:
                    return None, b""
            elif isinstance(event, h11.Request):
                request = event
                self._check_length(event)
                if conn.they_are_waiting_for_100_continue:
                    writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self._config.max_request_bytes:
                    raise HttpError(413, f"request over {self._config.max_request_bytes} bytes")
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body)
            else:  # ConnectionClosed or PAUSED
                return None, b""

    def _check_length(self, request: h11.Request) -> None:
        for name, value in request.headers:
            if name == b"content-length" and int(value) > self._config.max_request_bytes:
                raise HttpError(413, f"request over {self._config.max_request_bytes} bytes")
            if name == b"content-encoding" and value.lower() != b"identity":
                raise HttpError(415, "compressed requests are not taken")

    async def _answer(self, request: h11.Request, body: bytes) -> Answer:
        try:
            where = route(request.method.decode(), request.target.decode("latin-1"))
            return await self._route(where, request, body)
        except HttpError as exc:
            return json_answer(exc.status, {"error": exc.message})

    async def _route(self, where: Route, request: h11.Request, body: bytes) -> Answer:
        """
        Raises:
            HttpError: the answer is a refusal.
        """
        if where.kind is RouteKind.SERVER:
            return json_answer(
                200,
                {
                    "name": "edgefleet",
                    "version": self._version,
                    "extensions": ["binary_tensor_data"],
                },
            )
        if where.kind is RouteKind.LIVE:
            return json_answer(200, {"live": True})
        if where.kind is RouteKind.READY:
            ready = self._inference.ready
            return json_answer(200 if ready else 503, {"ready": ready})
        release = self._release(where)
        if where.kind is RouteKind.MODEL:
            return json_answer(200, model_metadata(where.model or "", release))
        if where.kind is RouteKind.MODEL_READY:
            return json_answer(200, {"name": where.model, "ready": True})
        return await self._infer(where.model or "", release, request, body)

    def _release(self, where: Route) -> Release:
        """The release serving under the name (and version) ``where`` asks for.

        Raises:
            HttpError: 503 when no model serves yet, 404 for another model or version.
        """
        slot = self._inference.slot
        if slot is None or not self._inference.ready:
            raise HttpError(503, "no model serves here yet")
        release = slot.release
        if where.model not in (self.model_name, release.name):
            raise HttpError(404, f"no model {where.model}; this device serves {self.model_name}")
        versions = (release.release_id, release.artifact.sha256, release.artifact.sha256[:12])
        if where.version is not None and where.version not in versions:
            raise HttpError(404, f"version {where.version} does not serve; {versions[0]} does")
        return release

    async def _infer(
        self, model: str, release: Release, request: h11.Request, body: bytes
    ) -> Answer:
        header_length = _header_length(request)
        if len(body) > _OFFLOAD_BYTES:
            decoded = await asyncio.to_thread(decode_infer, body, header_length, release)
        else:
            decoded = decode_infer(body, header_length, release)
        try:
            prediction = await self._inference.infer(decoded.feed)
        except InvalidInputError as exc:
            raise HttpError(400, str(exc)) from None
        except (NotReadyError, OverloadedError) as exc:
            raise HttpError(503, str(exc)) from None
        except InferenceFailedError as exc:
            raise HttpError(500, str(exc)) from None
        return encode_infer(model, decoded, prediction.outputs, prediction.release)


def _header_length(request: h11.Request) -> int | None:
    """
    Raises:
        HttpError: 400 for a header length that is not a number.
    """
    for name, value in request.headers:
        if name == HEADER_LENGTH.encode():
            try:
                return int(value)
            except ValueError:
                raise HttpError(400, f"{HEADER_LENGTH} is not a number") from None
    return None


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket left by an earlier run (never another kind of file)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            os.unlink(path)  # noqa: PTH108 (a socket, not a file of ours to keep)


async def _send(conn: h11.Connection, writer: asyncio.StreamWriter, answer: Answer) -> None:
    headers = [*answer.headers, ("content-length", str(len(answer.body)))]
    data = conn.send(h11.Response(status_code=answer.status, headers=headers))
    data += conn.send(h11.Data(data=answer.body))
    data += conn.send(h11.EndOfMessage())
    writer.write(data)
    await writer.drain()


async def _send_once(writer: asyncio.StreamWriter, answer: Answer) -> None:
    """Answer a connection refused before its request is read, and close it."""
    head = [f"HTTP/1.1 {answer.status} Service Unavailable"]
    head += [f"{name}: {value}" for name, value in answer.headers]
    head += [f"content-length: {len(answer.body)}", "connection: close", "", ""]
    writer.write("\r\n".join(head).encode() + answer.body)
    await writer.drain()
