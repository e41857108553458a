"""The Open Inference Protocol (KServe v2 REST), sans-IO: routes, requests, answers.

Pure functions over bytes and the serving release; :mod:`agent.serve` carries the HTTP.
Requests are untrusted: every refusal is an :class:`HttpError` with a status and a bounded
message, checked in a fixed order (route, size, JSON, schema, each tensor against the
release's declared inputs). Tensors come as JSON data (flat or nested, row-major) or,
with the binary tensor data extension, as raw little-endian bytes after the JSON header
(``Inference-Header-Content-Length``); binary tensors are read in place, not copied.
Outputs go back as JSON, or as binary where the request asks (``binary_data`` on an
output, ``binary_data_output`` on the request).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.runtime import Outputs
from schemas import Release
from schemas.errors import bound_text

__all__ = [
    "DATATYPES",
    "HEADER_LENGTH",
    "Answer",
    "HttpError",
    "InferRequest",
    "Route",
    "RouteKind",
    "decode_infer",
    "encode_infer",
    "json_answer",
    "model_metadata",
    "route",
]

HEADER_LENGTH: Final = "inference-header-content-length"
"""The header of the binary tensor data extension: the length of the JSON part."""

DATATYPES: Final = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "int8": "INT8",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}
"""Our tensor types (``schemas.TensorSpec.dtype``) as the protocol names them."""

_MAX_TENSORS: Final = 16
_MAX_RANK: Final = 8
_TEXT: Final = 300
"""The longest error text sent back (it quotes the request)."""


class HttpError(Exception):
    """A request refused: the status to answer and why, already bounded."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(bound_text(message, _TEXT))
        self.status = status
        self.message = str(self)


class RouteKind(StrEnum):
    SERVER = "server"
    LIVE = "live"
    READY = "ready"
    MODEL = "model"
    MODEL_READY = "model_ready"
    INFER = "infer"


@dataclass(frozen=True)
class Route:
    kind: RouteKind
    model: str | None = None
    version: str | None = None


_SERVER_ROUTES: Final = {
    ("v2",): RouteKind.SERVER,
    ("v2", "health", "live"): RouteKind.LIVE,
    ("v2", "health", "ready"): RouteKind.READY,
}
_MODEL_ROUTES: Final = {"": RouteKind.MODEL, "ready": RouteKind.MODEL_READY}


def route(method: str, target: str) -> Route:
    """Which API ``method`` ``target`` asks for.

    Raises:
        HttpError: 404 for a path the protocol does not have, 405 for the wrong method.
    """
    path = target.split("?", 1)[0]
    parts = tuple(p for p in path.split("/") if p)
    server = _SERVER_ROUTES.get(parts)
    found = _model_route(parts) if server is None else Route(server)
    expected = "POST" if found.kind is RouteKind.INFER else "GET"
    if method != expected:
        raise HttpError(405, f"{method} {path[:100]}: use {expected}")
    return found


def _model_route(parts: tuple[str, ...]) -> Route:
    if len(parts) < 3 or parts[:2] != ("v2", "models"):
        raise HttpError(404, f"no such path: /{'/'.join(parts)[:100]}")
    model, rest = parts[2], parts[3:]
    version = None
    if len(rest) >= 2 and rest[0] == "versions":
        version, rest = rest[1], rest[2:]
    tail = rest[0] if len(rest) == 1 else "" if not rest else None
    if tail == "infer":
        return Route(RouteKind.INFER, model, version)
    kind = None if tail is None else _MODEL_ROUTES.get(tail)
    if kind is None:
        raise HttpError(404, f"no such path: /{'/'.join(parts)[:100]}")
    return Route(kind, model, version)


# -- the request ------------------------------------------------------------------------


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _InputTensor(_Wire):
    name: str = Field(min_length=1, max_length=128)
    shape: tuple[int, ...] = Field(max_length=_MAX_RANK)
    datatype: str = Field(max_length=16)
    parameters: dict[str, Any] = Field(default_factory=dict, max_length=16)
    data: list[Any] | None = None


class _RequestedOutput(_Wire):
    name: str = Field(min_length=1, max_length=128)
    parameters: dict[str, Any] = Field(default_factory=dict, max_length=16)


class _Request(_Wire):
    id: str | None = Field(default=None, max_length=256)
    parameters: dict[str, Any] = Field(default_factory=dict, max_length=16)
    inputs: tuple[_InputTensor, ...] = Field(min_length=1, max_length=_MAX_TENSORS)
    outputs: tuple[_RequestedOutput, ...] | None = Field(default=None, max_length=_MAX_TENSORS)


@dataclass(frozen=True)
class InferRequest:
    """A decoded inference request: the feed, and how the answer is wanted."""

    feed: dict[str, npt.NDArray[np.generic]]
    request_id: str | None
    outputs: tuple[str, ...]
    """The outputs asked for, in order (all the release declares when none is named)."""
    binary: frozenset[str]
    """The outputs to send as binary data."""


def decode_infer(body: bytes, header_length: int | None, release: Release) -> InferRequest:
    """Decode an inference request against the serving ``release``.

    Raises:
        HttpError: 400, saying which part of the request is wrong.
    """
    json_part, binary = _split(body, header_length)
    try:
        request = _Request.model_validate_json(json_part)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3]
        )
        raise HttpError(400, f"not an inference request: {problems}") from None
    declared = {t.name: t.dtype for t in release.inputs}
    feed: dict[str, npt.NDArray[np.generic]] = {}
    offset = 0
    for tensor in request.inputs:
        if tensor.name in feed:
            raise HttpError(400, f"input {tensor.name} given twice")
        if tensor.name not in declared:
            raise HttpError(400, f"no input {tensor.name}; the model takes {sorted(declared)}")
        feed[tensor.name], offset = _tensor(tensor, declared[tensor.name], binary, offset)
    if offset != len(binary):
        raise HttpError(400, f"{len(binary) - offset} bytes of binary data belong to no input")
    return InferRequest(feed, request.id, *_wanted(request, release))


def _split(body: bytes, header_length: int | None) -> tuple[bytes, memoryview]:
    if header_length is None:
        return body, memoryview(b"")
    if not 0 < header_length <= len(body):
        raise HttpError(
            400, f"{HEADER_LENGTH} {header_length} does not fit a {len(body)}-byte body"
        )
    view = memoryview(body)
    return bytes(view[:header_length]), view[header_length:]


def _tensor(
    tensor: _InputTensor, dtype_name: str, binary: memoryview, offset: int
) -> tuple[npt.NDArray[np.generic], int]:
    """One input as an array of its declared type; where the next binary one starts."""
    name = tensor.name
    expected = DATATYPES.get(dtype_name)
    if tensor.datatype != expected:
        raise HttpError(
            400, f"input {name}: datatype {tensor.datatype}, the model takes {expected}"
        )
    if any(d < 0 for d in tensor.shape):
        raise HttpError(400, f"input {name}: negative size in shape {list(tensor.shape)}")
    dtype = np.dtype(dtype_name).newbyteorder("<")
    count = math.prod(tensor.shape)
    size = tensor.parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size != count * dtype.itemsize:
            raise HttpError(400, f"input {name}: binary_data_size {size} is not {count} x {dtype}")
        if offset + size > len(binary):
            raise HttpError(400, f"input {name}: {size} bytes of binary data are not there")
        array = np.frombuffer(binary, dtype=dtype, count=count, offset=offset)
        return array.reshape(tensor.shape), offset + size
    if tensor.data is None:
        raise HttpError(400, f"input {name}: no data and no binary_data_size")
    try:
        array = np.asarray(tensor.data, dtype=dtype)
    except (ValueError, TypeError, OverflowError):
        raise HttpError(400, f"input {name}: data is not a regular array of {dtype_name}") from None
    if array.size != count:
        raise HttpError(400, f"input {name}: {array.size} values for shape {list(tensor.shape)}")
    return array.reshape(tensor.shape), offset


def _wanted(request: _Request, release: Release) -> tuple[tuple[str, ...], frozenset[str]]:
    declared = [t.name for t in release.outputs]
    all_binary = request.parameters.get("binary_data_output") is True
    if request.outputs is None:
        return tuple(declared), frozenset(declared if all_binary else ())
    names: list[str] = []
    binary: set[str] = set()
    for output in request.outputs:
        if output.name not in declared:
            raise HttpError(400, f"no output {output.name}; the model gives {declared}")
        if output.name not in names:
            names.append(output.name)
        if all_binary or output.parameters.get("binary_data") is True:
            binary.add(output.name)
    return tuple(names), frozenset(binary)


# -- answers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """An HTTP answer's status, body and extra headers."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = (("content-type", "application/json"),)


def json_answer(status: int, document: object) -> Answer:
    return Answer(status, json.dumps(document, separators=(",", ":")).encode())


def _release_parameters(release: Release) -> dict[str, str]:
    variant = {} if release.variant is None else {"variant": release.variant}
    return {"release": release.release_id, "sha256": release.artifact.sha256, **variant}


def encode_infer(model: str, request: InferRequest, outputs: Outputs, release: Release) -> Answer:
    """The inference response for ``outputs``, naming the release that gave them."""
    items: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name in request.outputs:
        array = outputs[name]
        item: dict[str, Any] = {
            "name": name,
            "datatype": DATATYPES.get(array.dtype.name, array.dtype.name.upper()),
            "shape": list(array.shape),
        }
        if name in request.binary:
            raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            item["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            item["data"] = array.ravel().tolist()
        items.append(item)
    document: dict[str, Any] = {
        "model_name": model,
        "model_version": release.release_id,
        "parameters": _release_parameters(release),
        "outputs": items,
    }
    if request.request_id is not None:
        document["id"] = request.request_id
    head = json.dumps(document, separators=(",", ":")).encode()
    if not chunks:
        return Answer(200, head)
    headers = (
        ("content-type", "application/octet-stream"),
        (HEADER_LENGTH, str(len(head))),
    )
    return Answer(200, b"".join([head, *chunks]), headers)


def model_metadata(model: str, release: Release) -> dict[str, Any]:
    """The model metadata response: its inputs and outputs, free sizes as -1."""

    def tensors(specs: tuple[Any, ...]) -> list[dict[str, Any]]:
        return [
            {
                "name": t.name,
                "datatype": DATATYPES.get(t.dtype, t.dtype.upper()),
                "shape": [d if isinstance(d, int) else -1 for d in t.shape],
            }
            for t in specs
        ]

    return {
        "name": model,
        "versions": [release.release_id],
        "platform": "onnxruntime_onnx",
        "inputs": tensors(release.inputs),
        "outputs": tensors(release.outputs),
        "parameters": _release_parameters(release),
    }
