"""What the dashboard's local server answers, decided without I/O.

The server serves one page and relays its MQTT WebSocket to the broker. Every request
is judged here, in a fixed order: the ``Host`` it names (only the address the server
is bound to: a page of another site that rebinds its DNS name to 127.0.0.1 is refused),
the method, then the path. The WebSocket relay also needs the page's own ``Origin``, so
a page of another site open in the same browser cannot ride it (WebSockets are not
bound by the same-origin rule). Static files are a fixed table read from the package.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from typing import Final
from urllib.parse import parse_qs, urlsplit

from schemas.topics import check_name

__all__ = [
    "Refusal",
    "Route",
    "RouteKind",
    "StaticFile",
    "allowed_hosts",
    "load_static",
    "route",
]

_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".svg": "image/svg+xml",
}
"""What the page is made of; any other file in the package is not served."""
_MAX_TARGET_CHARS: Final = 512


class RouteKind(StrEnum):
    FILE = "file"
    CONFIG = "config"
    """The page's settings: the read-only account it logs in with."""
    AUDIT = "audit"
    RELAY = "relay"
    """The page's MQTT WebSocket, relayed to the broker's secure WebSockets listener."""


@dataclass(frozen=True)
class Route:
    kind: RouteKind
    path: str = ""
    """``FILE``: the file's path in the table."""
    rollout: str | None = None
    """``AUDIT``: only this rollout's entries."""


class Refusal(Exception):  # noqa: N818 (an answer, not a failure of ours)
    """A request the server answers with an error status and a short text."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class StaticFile:
    content_type: str
    body: bytes


def load_static() -> dict[str, StaticFile]:
    """Every file of the page, by URL path, read once from the installed package."""
    root = resources.files("dashboard") / "static"
    found: dict[str, StaticFile] = {}
    stack = [(root, "")]
    while stack:
        folder, prefix = stack.pop()
        for entry in folder.iterdir():
            if entry.is_dir():
                stack.append((entry, f"{prefix}/{entry.name}"))
                continue
            suffix = entry.name[entry.name.rfind(".") :] if "." in entry.name else ""
            if suffix in _TYPES:
                found[f"{prefix}/{entry.name}"] = StaticFile(_TYPES[suffix], entry.read_bytes())
    return found


def allowed_hosts(host: str, port: int) -> frozenset[str]:
    """The ``Host`` values a request may name: the bound address, and on loopback its
    other spellings (``localhost``, ``127.0.0.1``, ``[::1]``)."""
    names = {f"[{host}]:{port}" if ":" in host else f"{host}:{port}"}
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        names |= {f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"}
    return frozenset(names)


def route(
    method: str,
    target: str,
    headers: Mapping[str, str],
    *,
    hosts: frozenset[str],
    files: Mapping[str, StaticFile],
) -> Route:
    """Judge one request. ``headers`` has lower-case names.

    Raises:
        Refusal: 403 for another host or origin, 405 for a method other than GET, 426
            for a plain request to the relay, 404 for anything else unknown, 400 for a
            malformed target.
    """
    if headers.get("host", "").lower() not in hosts:
        raise Refusal(403, "unknown host")
    if method != "GET":
        raise Refusal(405, "only GET")
    if len(target) > _MAX_TARGET_CHARS or not target.startswith("/"):
        raise Refusal(400, "malformed target")
    parts = urlsplit(target)
    path = parts.path
    if path == "/mqtt":
        return _relay(headers, hosts)
    if path == "/config.json":
        return Route(RouteKind.CONFIG)
    if path == "/audit.json":
        return Route(RouteKind.AUDIT, rollout=_rollout_of(parts.query))
    path = "/index.html" if path == "/" else path
    if path in files:
        return Route(RouteKind.FILE, path=path)
    raise Refusal(404, "not found")


def _relay(headers: Mapping[str, str], hosts: frozenset[str]) -> Route:
    if headers.get("upgrade", "").lower() != "websocket":
        raise Refusal(426, "a WebSocket upgrade only")
    origin = headers.get("origin", "").lower()
    if not origin.startswith("http://") or origin.removeprefix("http://") not in hosts:
        raise Refusal(403, "the dashboard's own page only")
    return Route(RouteKind.RELAY)


def _rollout_of(query: str) -> str | None:
    try:
        values = parse_qs(query, max_num_fields=4).get("rollout")
        return check_name(values[0], "rollout id") if values and values[0] else None
    except ValueError:
        raise Refusal(400, "malformed query") from None
