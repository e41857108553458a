"""Hand-built ONNX graphs (``onnx.helper``) from trained dense-layer weights.

Every exported classifier has one float32 input ``[N, features]`` and two outputs, which
is the contract with devices:

* output ``probabilities``: float32 ``[N, classes]``, softmax over the classes;
* output ``label``: int64 ``[N]``, the argmax class.

The digits models read input ``pixels`` (8x8 digit pixels scaled to ``[0, 1]``, raw / 16,
``[N, 64]``, 10 classes); the cytology models read ``features`` (30 raw measurements,
``[N, 30]``, 2 classes) and standardise them in the graph (``Sub`` then ``Div``), so a
device feeds what its sensors give.

Models use the default ONNX domain at opset :data:`OPSET` only, so any onnxruntime from 1.14
on runs them with the plain ``CPUExecutionProvider``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.datasets import CYTOLOGY_FEATURES, N_CLASSES, N_FEATURES
from models.train import DenseLayer, Standardizer

__all__ = [
    "CYTOLOGY_INPUT_NAME",
    "CYTOLOGY_INPUT_SHAPE",
    "EXPORTER_VERSION",
    "INPUT_NAME",
    "INPUT_SHAPE",
    "IR_VERSION",
    "LABEL_OUTPUT",
    "OPSET",
    "OUTPUT_NAMES",
    "PROBABILITIES_OUTPUT",
    "PRODUCER_NAME",
    "SlowRefinement",
    "export_classifier",
    "export_slow_classifier",
    "serialize",
    "set_metadata",
]

PRODUCER_NAME = "edgefleet"
# Bump whenever the graphs produced here change, so cached files get rebuilt.
EXPORTER_VERSION = "1"
OPSET = 17
IR_VERSION = 8
INPUT_NAME = "pixels"
INPUT_SHAPE: tuple[int | str, ...] = ("N", N_FEATURES)
CYTOLOGY_INPUT_NAME = "features"
CYTOLOGY_INPUT_SHAPE: tuple[int | str, ...] = ("N", CYTOLOGY_FEATURES)
PROBABILITIES_OUTPUT = "probabilities"
LABEL_OUTPUT = "label"
OUTPUT_NAMES: tuple[str, ...] = (PROBABILITIES_OUTPUT, LABEL_OUTPUT)


@dataclass(frozen=True)
class SlowRefinement:
    """Parameters of the deliberately wasteful refinement block of ``digits-v2-slow``.

    ``z0 = h @ lift``; ``steps`` times ``z <- z + eps * tanh(z @ mix)`` with ONE shared
    ``width x width`` ``mix`` matrix; ``logits += (z - z0) @ readout``. ``eps = 1 / steps``
    bounds every coordinate of ``z - z0`` by 1, and ``readout`` is scaled by ``readout_scale``
    so the block nudges logits by a few hundredths at most. lift/mix/readout are seeded
    pseudo-random, *not trained*: the block adds cost, not accuracy.
    """

    width: int = 1024
    steps: int = 320
    readout_scale: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.width < 1 or self.steps < 1:
            raise ValueError("width and steps must be positive")

    def as_dict(self) -> dict[str, int | float]:
        """JSON-able parameters (part of the model's build recipe)."""
        return {
            "width": self.width,
            "steps": self.steps,
            "readout_scale": self.readout_scale,
            "seed": self.seed,
        }

    def weights(
        self, in_width: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """``(lift, mix, readout)`` with shapes ``(in, w)``, ``(w, w)``, ``(w, 10)``."""
        rng = np.random.default_rng(self.seed)
        lift = rng.standard_normal((in_width, self.width)) / np.sqrt(in_width)
        mix = rng.standard_normal((self.width, self.width)) / np.sqrt(self.width)
        readout = (
            rng.standard_normal((self.width, N_CLASSES)) * self.readout_scale / np.sqrt(self.width)
        )
        return (
            lift.astype(np.float32),
            mix.astype(np.float32),
            readout.astype(np.float32),
        )


class _GraphBuilder:
    def __init__(self, input_name: str) -> None:
        self.input_name = input_name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []

    def const(self, name: str, value: npt.NDArray[np.float32]) -> str:
        self.initializers.append(numpy_helper.from_array(value, name=name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], output: str, **attrs: int) -> str:
        node = helper.make_node(op_type, list(inputs), [output], name=output)
        node.attribute.extend(helper.make_attribute(key, value) for key, value in attrs.items())
        self.nodes.append(node)
        return output

    def dense(self, x: str, layer: DenseLayer, prefix: str) -> str:
        w = self.const(f"{prefix}.weight", layer.weight)
        b = self.const(f"{prefix}.bias", layer.bias)
        y = self.op("Add", [self.op("MatMul", [x, w], f"{prefix}.matmul"), b], f"{prefix}.out")
        if layer.activation == "relu":
            y = self.op("Relu", [y], f"{prefix}.relu")
        return y

    def standardize(self, x: str, standardizer: Standardizer) -> str:
        mean = self.const("standardize.mean", standardizer.mean)
        scale = self.const("standardize.scale", standardizer.scale)
        return self.op(
            "Div", [self.op("Sub", [x, mean], "standardize.sub"), scale], "standardize.out"
        )

    def finish(
        self, logits: str, graph_name: str, doc_string: str, *, features: int, classes: int
    ) -> onnx.ModelProto:
        batch = INPUT_SHAPE[0]
        self.op("Softmax", [logits], PROBABILITIES_OUTPUT, axis=-1)
        self.op("ArgMax", [logits], LABEL_OUTPUT, axis=1, keepdims=0)
        graph = helper.make_graph(
            self.nodes,
            graph_name,
            [helper.make_tensor_value_info(self.input_name, TensorProto.FLOAT, [batch, features])],
            [
                helper.make_tensor_value_info(
                    PROBABILITIES_OUTPUT, TensorProto.FLOAT, [batch, classes]
                ),
                helper.make_tensor_value_info(LABEL_OUTPUT, TensorProto.INT64, [batch]),
            ],
            self.initializers,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name=PRODUCER_NAME,
            producer_version=EXPORTER_VERSION,
            doc_string=doc_string,
        )
        onnx.checker.check_model(model, full_check=True)
        return model


def export_classifier(
    layers: Sequence[DenseLayer],
    *,
    graph_name: str,
    doc_string: str = "",
    input_name: str = INPUT_NAME,
    standardizer: Standardizer | None = None,
) -> onnx.ModelProto:
    """[``Sub+Div``] then dense layers as a ``MatMul+Add(+Relu)`` chain, then ``Softmax``
    and ``ArgMax``; the input width is the first layer's, the class count the last one's."""
    if not layers:
        raise ValueError("a classifier needs at least one layer")
    g = _GraphBuilder(input_name)
    x = input_name if standardizer is None else g.standardize(input_name, standardizer)
    for i, layer in enumerate(layers):
        x = g.dense(x, layer, f"dense{i}")
    return g.finish(
        x,
        graph_name,
        doc_string,
        features=layers[0].weight.shape[0],
        classes=layers[-1].weight.shape[1],
    )


def export_slow_classifier(
    layers: Sequence[DenseLayer],
    refinement: SlowRefinement,
    *,
    graph_name: str,
    doc_string: str = "",
) -> onnx.ModelProto:
    """The classifier of ``layers`` plus the unrolled, weight-tied :class:`SlowRefinement`.

    The block reads the last hidden activation (the input of the final layer) and adds its
    small output to the logits. Every step depends on the input, so no constant folding can
    remove it; single-sample cost is ``steps`` matrix-vector products with a
    ``width x width`` matrix.
    """
    if len(layers) < 2:
        raise ValueError("the refinement block needs a hidden layer to read from")
    g = _GraphBuilder(INPUT_NAME)
    x = INPUT_NAME
    for i, layer in enumerate(layers[:-1]):
        x = g.dense(x, layer, f"dense{i}")
    hidden = x
    logits = g.dense(hidden, layers[-1], f"dense{len(layers) - 1}")

    lift, mix, readout = refinement.weights(layers[-1].weight.shape[0])
    g.const("refine.lift", lift)
    g.const("refine.mix", mix)
    g.const("refine.readout", readout)
    g.const("refine.eps", np.array(1.0 / refinement.steps, dtype=np.float32))
    z0 = g.op("MatMul", [hidden, "refine.lift"], "refine.z0")
    z = z0
    for k in range(refinement.steps):
        m = g.op("MatMul", [z, "refine.mix"], f"refine.{k}.matmul")
        t = g.op("Tanh", [m], f"refine.{k}.tanh")
        s = g.op("Mul", [t, "refine.eps"], f"refine.{k}.scaled")
        z = g.op("Add", [z, s], f"refine.{k}.z")
    delta = g.op("Sub", [z, z0], "refine.delta")
    nudge = g.op("MatMul", [delta, "refine.readout"], "refine.nudge")
    logits = g.op("Add", [logits, nudge], "refine.logits")
    return g.finish(logits, graph_name, doc_string, features=N_FEATURES, classes=N_CLASSES)


def set_metadata(model: onnx.ModelProto, props: Mapping[str, str]) -> None:
    """Replace the model's ``metadata_props`` with ``props`` (sorted by key)."""
    helper.set_model_props(model, dict(sorted(props.items())))


def serialize(model: onnx.ModelProto) -> bytes:
    """Deterministic protobuf bytes of ``model``."""
    data: bytes = model.SerializeToString(deterministic=True)
    return data
