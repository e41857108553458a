"""msgpack codec for every message on the wire.

``decode`` is the only way bytes become a message: it caps the size before parsing,
refuses anything that is not a msgpack map of the expected schema and version, and
raises :class:`~schemas.errors.MalformedPayloadError` with a reason otherwise.
"""

from __future__ import annotations

from typing import Any, Final, TypeVar

import msgpack
from pydantic import BaseModel, ConfigDict, ValidationError

from schemas.errors import MalformedPayloadError, Reason

__all__ = ["MAX_MESSAGE_BYTES", "SCHEMA_VERSION", "WireModel", "decode", "encode"]

SCHEMA_VERSION: Final = 1
# Control messages are small; a cap well above the largest legitimate one keeps a
# hostile publisher from making a party buffer and parse megabytes.
MAX_MESSAGE_BYTES: Final = 256 * 1024

M = TypeVar("M", bound="WireModel")


class WireModel(BaseModel):
    """Base of all wire messages: frozen, closed, versioned."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)

    v: int = SCHEMA_VERSION


def encode(message: WireModel) -> bytes:
    """Serialize a message to msgpack bytes."""
    packed: bytes = msgpack.packb(message.model_dump(mode="python"), use_bin_type=True)
    return packed


def decode(data: bytes, model: type[M], *, max_bytes: int = MAX_MESSAGE_BYTES) -> M:
    """Parse untrusted bytes into ``model``.

    Raises:
        MalformedPayloadError: oversized, not msgpack, not a map, wrong schema version, or
            not valid for ``model``.
    """
    if len(data) > max_bytes:
        raise MalformedPayloadError(
            Reason.OVERSIZED, f"{model.__name__} of {len(data)} bytes exceeds {max_bytes}"
        )
    try:
        raw: Any = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise MalformedPayloadError(Reason.MALFORMED, f"not msgpack: {exc}") from exc
    if not isinstance(raw, dict):
        raise MalformedPayloadError(Reason.MALFORMED, f"expected a map, got {type(raw).__name__}")
    version = raw.get("v")
    if version != SCHEMA_VERSION:
        raise MalformedPayloadError(
            Reason.UNSUPPORTED_VERSION, f"{model.__name__} schema version {version!r}"
        )
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise MalformedPayloadError(
            Reason.SCHEMA, f"{model.__name__}.{where}: {first['msg']}"
        ) from exc
