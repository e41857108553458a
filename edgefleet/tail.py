"""``edgefleet tail``: any topic of the tree, decoded, as JSON lines.

The telemetry and state on the broker are msgpack, which generic MQTT tools show as
noise. :class:`Renderer` turns one received message into one JSON object: its topic,
whether it was retained, when it was received, which channel of the tree it is
(``schemas.catalog``) and the message decoded by the same codec the parties use. A signed
document also says who signed it and whether the signatures verify against the home's
trust. The body of a signed document is shown even when they do not: this is a reader
for people, who want to see what a forged manifest says, and nothing acts on it.

Hostile input: a payload that does not decode gives a line with the reason and the
detail, and the next message is read; every line is at most ``max_line`` characters (a
message beyond that is cut, and says so); every text quoted from the wire is bounded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.transport import IncomingOverflow, Message, Transport
from schemas import (
    MANIFEST_KIND,
    OFFLINE,
    ONLINE,
    TRUST_KIND,
    RejectedError,
    Role,
    TrustedState,
    WireModel,
    decode,
)
from schemas.catalog import Body, Channel, channel_of
from schemas.envelope import Envelope, open_envelope
from schemas.errors import MalformedPayloadError, PolicyError, Reason, bound_text
from schemas.topics import parse
from schemas.trust import TrustDoc

__all__ = [
    "DEFAULT_MAX_LINE",
    "MIN_MAX_LINE",
    "Renderer",
    "TailOptions",
    "follow",
    "parse_duration",
]

DEFAULT_MAX_LINE: Final = 64 * 1024
"""Characters of one line at most, by default: a full status or manifest fits."""
MIN_MAX_LINE: Final = 1024
"""The smallest bound a line may be given: what a line says besides its message fits."""
TOPIC_CHARS: Final = 300
"""Characters of a topic a line quotes (a topic of the tree is far shorter)."""
_SHORT_BYTES: Final = 64
"""Bytes fields up to this long (keys, signatures) are shown in hex; longer ones by size."""
_UNITS: Final = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")

RawFormat = Literal["base64", "hex"]


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``15m``, ``2h`` or ``1d``.

    Raises:
        ValueError: anything else.
    """
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        msg = f"invalid duration {text[:40]!r}: use e.g. 90, 90s, 15m, 2h or 1d"
        raise ValueError(msg)
    return float(match[1]) * _UNITS[match[2]]


@dataclass(frozen=True, kw_only=True)
class TailOptions:
    raw: RawFormat | None = None
    """Show each payload encoded so (no decoding), not the message."""
    since_s: float | None = None
    """Skip messages whose own time is older than this many seconds before receipt."""
    max_line: int = DEFAULT_MAX_LINE

    def __post_init__(self) -> None:
        if self.max_line < MIN_MAX_LINE:
            msg = f"max_line must be at least {MIN_MAX_LINE}"
            raise ValueError(msg)
        if self.since_s is not None and not self.since_s >= 0:
            msg = "since_s must not be negative"
            raise ValueError(msg)


def _jsonable(value: Any) -> Any:
    """A model's dump as JSON takes it: short bytes in hex, long ones by size, floats
    that JSON cannot hold as strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.hex() if len(value) <= _SHORT_BYTES else {"bytes": len(value)}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _dumps(obj: dict[str, Any]) -> str:
    # ASCII only: control and bidi characters from the wire reach a terminal escaped.
    return json.dumps(obj, ensure_ascii=True, allow_nan=False)


class Renderer:
    """Received messages to JSON lines."""

    def __init__(
        self,
        root_keys: Mapping[str, Ed25519PublicKey],
        trust: bytes | None,
        options: TailOptions,
        *,
        now: float,
    ) -> None:
        """Signed documents are checked against ``trust`` (the home's TrustDoc), verified
        with ``root_keys``; a newer root-signed TrustDoc seen on the wire replaces it, as
        it would on a device.

        Raises:
            RejectedError: ``trust`` does not verify against ``root_keys``, or expired.
        """
        self._root_keys = dict(root_keys)
        self._trusted = TrustedState(self._root_keys)
        self._trust = trust
        if trust is not None:
            self._trusted.update_trust(trust, now=now)
        self._options = options

    def render(self, message: Message, received_at: float) -> str | None:
        """The line for ``message``; None when ``since_s`` skips it."""
        line: dict[str, Any] = {
            "topic": bound_text(message.topic, TOPIC_CHARS),
            "retained": message.retain,
            "received_at": round(received_at, 3),
        }
        try:
            channel = _channel(message.topic)
        except RejectedError as exc:
            return _dumps(line | {"error": _error(exc)})
        line["channel"] = channel.key
        if not message.payload:
            return _dumps(line | {"cleared": True})
        try:
            shown, stamp = self._decode(channel, message.payload, line, received_at)
        except RejectedError as exc:
            if self._options.raw is None:
                return _dumps(line | {"error": _error(exc)})
            shown, stamp = None, None
        since = self._options.since_s
        if since is not None and stamp is not None and stamp < received_at - since:
            return None
        if self._options.raw is not None:
            line.pop("signed", None)
            return _cut(line | self._raw(message.payload), "payload", self._options.max_line)
        return _cut(line | {"message": shown}, "message", self._options.max_line)

    def _raw(self, payload: bytes) -> dict[str, Any]:
        hexed = self._options.raw == "hex"
        text = payload.hex() if hexed else base64.b64encode(payload).decode()
        return {"bytes": len(payload), "encoding": self._options.raw, "payload": text}

    def _decode(
        self, channel: Channel, payload: bytes, line: dict[str, Any], now: float
    ) -> tuple[Any, float | None]:
        """What the line shows of the payload, and the message's own time. Notes a
        signed document's signers and verdict in ``line``.

        Raises:
            RejectedError: the payload is not what the channel carries.
        """
        match channel.body:
            case Body.PRESENCE:
                if payload not in (ONLINE, OFFLINE):
                    detail = f"presence {payload[:32]!r} is neither online nor offline"
                    raise MalformedPayloadError(Reason.MALFORMED, detail)
                return payload.decode(), None
            case Body.BYTES:
                return {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}, None
            case Body.SIGNED:
                assert channel.model is not None
                assert channel.signed_kind is not None
                envelope = decode(payload, Envelope)
                line["signed"] = self._signed(channel.signed_kind, payload, envelope, now)
                model = decode(envelope.body, channel.model)
            case Body.MSGPACK:
                assert channel.model is not None
                model = decode(payload, channel.model)
        return _jsonable(model.model_dump(mode="python")), _stamp(model, channel.stamp)

    def _signed(self, kind: str, payload: bytes, envelope: Envelope, now: float) -> dict[str, Any]:
        """Who signed, and whether it verifies against the trust held."""
        roles = _roles(self._trusted.trust)
        signed: dict[str, Any] = {
            "kind": bound_text(envelope.kind, 32),
            "signers": [{"key": s.key, "roles": roles.get(s.key, [])} for s in envelope.sigs],
        }
        try:
            self._verify(kind, payload, now)
        except RejectedError as exc:
            return signed | {"verified": False, "error": _error(exc)}
        return signed | {"verified": True}

    def _verify(self, kind: str, payload: bytes, now: float) -> None:
        """Raises: RejectedError: the signatures do not verify (or nothing to verify with)."""
        doc = self._trusted.trust
        if kind == TRUST_KIND:
            if payload == self._trust:
                return
            if doc is not None and _version(payload) > doc.version:
                self._trusted.update_trust(payload, now=now)  # a rotation, as a device takes it
                self._trust = payload
                return
            # An older or another document: signed by the root keys, and its own root.
            TrustedState(self._root_keys).update_trust(payload, now=now)
            return
        if doc is None:
            raise PolicyError(Reason.NOT_TRUSTED, "no trust document to verify with")
        role = Role.MANIFEST if kind == MANIFEST_KIND else Role.OPERATOR
        threshold = doc.roles[role].threshold
        open_envelope(payload, kind=kind, allowed=doc.keys_for(role), threshold=threshold)


def _channel(topic: str) -> Channel:
    """Raises: RejectedError: not a topic of the tree (or of none the catalog lists)."""
    try:
        return channel_of(parse(topic))
    except KeyError:  # a kind of topic schemas/catalog.py does not list yet
        raise MalformedPayloadError(Reason.MALFORMED, "no channel of the catalog") from None


def _version(payload: bytes) -> int:
    return decode(decode(payload, Envelope).body, TrustDoc).version


def _roles(doc: TrustDoc | None) -> dict[str, list[str]]:
    roles: dict[str, list[str]] = {}
    for role, keys in ({} if doc is None else doc.roles).items():
        for key in keys.keys:
            roles.setdefault(key, []).append(role.value)
    return roles


def _stamp(model: WireModel, field: str | None) -> float | None:
    value = None if field is None else getattr(model, field)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _error(exc: RejectedError) -> dict[str, str]:
    return {"reason": exc.reason.value, "detail": exc.detail}


def _cut(line: dict[str, Any], key: str, limit: int) -> str:
    """``line`` as JSON within ``limit`` characters: ``line[key]`` replaced by its JSON
    text, cut, when the whole is longer."""
    whole = _dumps(line)
    if len(whole) <= limit:
        return whole
    part = line[key] if isinstance(line[key], str) else _dumps({key: line[key]})
    cut = dict(line)
    cut[key] = None
    cut["truncated"] = {"chars": len(part), "shown": ""}
    room = limit - len(_dumps(cut)) - 16
    shown = part[: max(room, 0)]
    # Escapes may lengthen what is kept: take off until the line fits.
    while True:
        cut["truncated"]["shown"] = shown
        text = _dumps(cut)
        if len(text) <= limit or not shown:
            return text
        shown = shown[: len(shown) - max(len(text) - limit, 1)]


async def follow(
    transport: Transport,
    filters: Sequence[str],
    renderer: Renderer,
    *,
    clock: Callable[[], float] = time.time,
) -> AsyncGenerator[str, None]:
    """Subscribe to ``filters`` and yield a line per message (none for those ``since``
    skips); an overflow of the session's queue gives a line saying how many were lost."""
    await transport.subscribe(*filters)
    messages = transport.messages()
    while True:
        try:
            message = await anext(messages)
        except StopAsyncIteration:
            return
        except IncomingOverflow as exc:
            detail = f"{exc.dropped} messages dropped: the reader fell behind"
            error = {"reason": "overflow", "detail": detail}
            yield _dumps({"received_at": round(clock(), 3), "error": error})
            continue
        line = renderer.render(message, clock())
        if line is not None:
            yield line
