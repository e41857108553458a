"""Checking a candidate model against a hardware class profile, before any device
sees it: size, precision, and that it loads with the declared inputs and outputs."""

from __future__ import annotations

import onnx
import onnxruntime as ort

from coordinator.profiles import ClassProfile
from schemas import Candidate, TensorSpec
from schemas.manifest import dtype_name

__all__ = ["ModelFacts", "problems_for_class"]

_INT8_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "QLinearMatMul",
        "MatMulInteger",
        "QLinearConv",
        "ConvInteger",
        "DynamicQuantizeLinear",
    }
)


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
        ops = {node.op_type for node in model.graph.node}
        fp16 = any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
        self.size = len(data)
        self.precision = "int8" if ops & _INT8_OPS else "fp16" if fp16 else "fp32"
        self.inputs = tuple(_spec(i) for i in session.get_inputs())
        self.outputs = tuple(_spec(o) for o in session.get_outputs())


def _spec(arg: ort.NodeArg) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else (d or None) for d in arg.shape)
    return TensorSpec(name=arg.name, dtype=dtype_name(arg.type), shape=shape)


def _io(specs: tuple[TensorSpec, ...]) -> dict[str, str]:
    return {s.name: s.dtype for s in specs}


def problems_for_class(facts: ModelFacts, candidate: Candidate, profile: ClassProfile) -> list[str]:
    """Why ``candidate`` cannot go to ``profile``'s class; empty when it can."""
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
