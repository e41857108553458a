"""Checking a candidate variant against a hardware class profile, before any device
sees it: size, precision, that it loads with the declared inputs and outputs, and
that its golden self-test vectors hold on the model itself."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort

from coordinator.profiles import ClassProfile
from models.precision import Precision, detect_precision
from schemas import GoldenSet, RejectedError, TensorSpec, Variant, decode, golden_mismatches
from schemas.golden import MAX_GOLDEN_BYTES
from schemas.manifest import dtype_name

__all__ = ["ModelFacts", "golden_problems", "problems_for_class"]


class ModelFacts:
    """What a model file is, read with onnx and onnxruntime (blocking)."""

    def __init__(self, data: bytes) -> None:
        """Raises: ValueError when onnx or onnxruntime cannot load ``data``."""
        try:
            model = onnx.load_from_string(data)
            session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnx/onnxruntime raise a zoo of types
            msg = f"model does not load: {exc}"
            raise ValueError(msg) from exc
        self.size = len(data)
        self.precision: Precision = detect_precision(model)
        self.session = session
        self.inputs = tuple(_spec(i) for i in session.get_inputs())
        self.outputs = tuple(_spec(o) for o in session.get_outputs())


def _spec(arg: ort.NodeArg) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else (d or None) for d in arg.shape)
    return TensorSpec(name=arg.name, dtype=dtype_name(arg.type), shape=shape)


def _io(specs: tuple[TensorSpec, ...]) -> dict[str, str]:
    return {s.name: s.dtype for s in specs}


def problems_for_class(facts: ModelFacts, candidate: Variant, profile: ClassProfile) -> list[str]:
    """Why the variant ``candidate`` cannot go to ``profile``'s class; empty when it can."""
    problems = []
    if facts.size > profile.max_model_bytes:
        problems.append(
            f"{facts.size} bytes exceed {profile.name}'s limit of {profile.max_model_bytes}"
        )
    if facts.precision not in profile.precisions:
        problems.append(f"{facts.precision} is not among {profile.name}'s {profile.precisions}")
    if _io(facts.inputs) != _io(candidate.inputs):
        problems.append(
            f"declared inputs {_io(candidate.inputs)} but model has {_io(facts.inputs)}"
        )
    if not _io(candidate.outputs).items() <= _io(facts.outputs).items():
        problems.append(
            f"declared outputs {_io(candidate.outputs)} but model has {_io(facts.outputs)}"
        )
    return problems


def golden_problems(facts: ModelFacts, variant: Variant, golden: bytes) -> list[str]:
    """Why the variant's golden vectors would fail every device's self-test; empty when
    the model itself passes them (blocking: runs the model)."""
    try:
        vectors = decode(golden, GoldenSet, max_bytes=MAX_GOLDEN_BYTES)
    except RejectedError as exc:
        return [f"golden vectors: {exc}"]
    if vectors.model_sha256 != variant.artifact.sha256:
        return [f"golden vectors are for model {vectors.model_sha256[:12]}, not this one"]
    names = [o.name for o in facts.session.get_outputs()]

    def run(feed: Mapping[str, npt.NDArray[np.generic]]) -> dict[str, npt.NDArray[np.generic]]:
        return dict(zip(names, facts.session.run(names, dict(feed)), strict=True))

    try:
        mismatches = golden_mismatches(vectors, run)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises a zoo of types on a bad feed
        return [f"golden vectors do not run on the model: {exc}"]
    return [f"golden vectors fail on the model itself: {m}" for m in mismatches]
