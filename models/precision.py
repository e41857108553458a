"""What numeric precision a model build runs in, read from its graph.

The coordinator matches this against each hardware class's allowed precisions, so it must
recognise the builds :mod:`models.optimize` makes and the same builds after onnxruntime's
graph optimisations (which fuse them into ``com.microsoft`` operators):

* ``int8-dynamic``: activations are quantised at run time (``DynamicQuantizeLinear``, or an
  operator that does it inside, such as ``DynamicQuantizeMatMul``);
* ``int8``: statically quantised, with scales fixed at build time (QDQ pairs or QOperator
  nodes such as ``QLinearMatMul``/``QGemm``, or integer matrix products fed by them);
* ``fp16``: most initializer elements are float16;
* ``fp32``: anything else.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, get_args

import onnx

__all__ = ["PRECISIONS", "Precision", "detect_precision"]

Precision = Literal["fp32", "fp16", "int8", "int8-dynamic"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)

_DYNAMIC_OPS = frozenset({"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM"})
_INTEGER_PRODUCTS = frozenset({"MatMulInteger", "ConvInteger", "MatMulIntegerToFloat"})
_STATIC_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "QLinearMatMul",
        "QLinearConv",
        "QLinearAdd",
        "QLinearMul",
        "QLinearSoftmax",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearAveragePool",
        "QLinearGlobalAveragePool",
        "QLinearConcat",
        "QGemm",
        "QAttention",
    }
)


def detect_precision(model: onnx.ModelProto) -> Precision:
    """The precision ``model`` computes in (see the module docstring for the rules)."""
    nodes = list(_nodes(model.graph))
    ops = {node.op_type for node in nodes}
    if ops & _DYNAMIC_OPS:
        return "int8-dynamic"
    if ops & _STATIC_OPS or ops & _INTEGER_PRODUCTS:
        return "int8"
    float16, float32 = _initializer_elements(model.graph)
    if float16 > float32:
        return "fp16"
    return "fp32"


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of the subgraphs of its control-flow nodes."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    yield from _nodes(sub)


def _initializer_elements(graph: onnx.GraphProto) -> tuple[int, int]:
    """``(float16, float32)`` element counts over initializers and ``Constant`` nodes."""
    counts = {onnx.TensorProto.FLOAT16: 0, onnx.TensorProto.FLOAT: 0}
    tensors = list(graph.initializer)
    tensors += [
        attribute.t
        for node in _nodes(graph)
        if node.op_type == "Constant"
        for attribute in node.attribute
        if attribute.type == onnx.AttributeProto.TENSOR
    ]
    for tensor in tensors:
        if tensor.data_type in counts:
            elements = 1
            for dim in tensor.dims:
                elements *= dim
            counts[tensor.data_type] += elements
    return counts[onnx.TensorProto.FLOAT16], counts[onnx.TensorProto.FLOAT]
