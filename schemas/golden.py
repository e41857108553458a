"""Golden self-test vectors: real inputs and the outputs one model variant must give.

A golden set travels as an artifact of its own (chunked and checked like a model);
the signed manifest names it by sha256 beside the model it belongs to, and the set
names that model's sha256 in turn, so vectors cannot be paired with another model.
An agent runs every case on a freshly loaded model before it takes traffic: float
outputs must match within the set's tolerances, every other output exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Annotated, Final, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field, model_validator

from schemas.artifact import SHA256_PATTERN
from schemas.codec import WireModel

__all__ = [
    "MAX_GOLDEN_BYTES",
    "GoldenCase",
    "GoldenSet",
    "Tensor",
    "Tolerance",
    "golden_mismatches",
]

MAX_GOLDEN_BYTES: Final = 16 * 1024 * 1024
"""Golden sets may exceed a control message (one camera frame can): this caps them."""

TensorDtype = Literal["float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool"]
_Name = Annotated[str, Field(min_length=1, max_length=128)]


class Tensor(WireModel):
    """A dense array: numpy dtype name, shape, and its C-order little-endian bytes."""

    dtype: TensorDtype
    shape: tuple[Annotated[int, Field(ge=0)], ...] = Field(max_length=8)
    data: bytes

    @model_validator(mode="after")
    def _sized(self) -> Tensor:
        expected = math.prod(self.shape) * np.dtype(self.dtype).itemsize
        if len(self.data) != expected:
            msg = f"{len(self.data)} bytes for a {self.dtype} tensor of shape {self.shape}"
            raise ValueError(msg)
        return self

    @classmethod
    def of(cls, array: npt.NDArray[np.generic]) -> Tensor:
        """Raises: ValueError for a dtype the wire does not carry."""
        little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        return cls(dtype=array.dtype.name, shape=tuple(array.shape), data=little.tobytes())

    def array(self) -> npt.NDArray[np.generic]:
        dtype = np.dtype(self.dtype).newbyteorder("<")
        return np.frombuffer(self.data, dtype=dtype).reshape(self.shape)


class Tolerance(WireModel):
    """``|actual - expected| <= atol + rtol * |expected|``, element-wise."""

    atol: float = Field(ge=0.0, allow_inf_nan=False)
    rtol: float = Field(ge=0.0, allow_inf_nan=False)


class GoldenCase(WireModel):
    inputs: dict[_Name, Tensor] = Field(min_length=1, max_length=16)
    outputs: dict[_Name, Tensor] = Field(min_length=1, max_length=16)


class GoldenSet(WireModel):
    model_sha256: str = Field(pattern=SHA256_PATTERN)
    """The one model variant these outputs were computed with."""
    cases: tuple[GoldenCase, ...] = Field(min_length=1, max_length=256)
    tolerances: dict[_Name, Tolerance] = Field(default_factory=dict, max_length=16)
    """For float outputs; an output without one must match exactly."""
    source: str = Field(default="", max_length=200)
    """Where the inputs came from (a data set and split), for people."""


Runner = Callable[[Mapping[str, npt.NDArray[np.generic]]], Mapping[str, npt.NDArray[np.generic]]]


def golden_mismatches(golden: GoldenSet, run: Runner, *, limit: int = 5) -> list[str]:
    """Run every case through ``run`` (feed -> outputs by name) and say where the
    outputs differ from the expected ones; empty when all match.

    ``run`` may raise; that is the caller's to report.
    """
    problems: list[str] = []
    for index, case in enumerate(golden.cases):
        outputs = run({name: t.array() for name, t in case.inputs.items()})
        for name, expected_tensor in case.outputs.items():
            problem = _compare(name, outputs.get(name), expected_tensor, golden.tolerances)
            if problem:
                problems.append(f"case {index}: {problem}")
                if len(problems) >= limit:
                    return problems
    return problems


def _compare(
    name: str,
    actual: npt.NDArray[np.generic] | None,
    expected_tensor: Tensor,
    tolerances: Mapping[str, Tolerance],
) -> str | None:
    if actual is None:
        return f"no output {name}"
    expected = expected_tensor.array()
    got = np.asarray(actual)
    if got.shape != expected.shape:
        return f"{name} has shape {got.shape}, expected {expected.shape}"
    tolerance = tolerances.get(name)
    if expected.dtype.kind == "f" and tolerance is not None:
        return _compare_within(name, got, expected, tolerance)
    if got.dtype != expected.dtype or not np.array_equal(got, expected):
        return f"{name} is {_short(got)}, expected {_short(expected)}"
    return None


def _compare_within(
    name: str, got: npt.NDArray[np.generic], expected: npt.NDArray[np.generic], tolerance: Tolerance
) -> str | None:
    got64 = got.astype(np.float64)
    want64 = expected.astype(np.float64)
    if not np.all(np.isfinite(got64)):
        return f"{name} is not finite"
    excess = np.abs(got64 - want64) - (tolerance.atol + tolerance.rtol * np.abs(want64))
    if np.any(excess > 0):
        worst = float(np.max(np.abs(got64 - want64)))
        return (
            f"{name} differs by up to {worst:.3g} "
            f"(atol {tolerance.atol:g}, rtol {tolerance.rtol:g})"
        )
    return None


def _short(array: npt.NDArray[np.generic]) -> str:
    flat = array.reshape(-1)
    text = np.array2string(flat[:6], precision=4, separator=",")
    return f"{array.dtype}{text}{'...' if flat.size > 6 else ''}"
