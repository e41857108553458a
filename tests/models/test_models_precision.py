"""detect_precision on real builds, as written and as onnxruntime rewrites them."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

from models import DemoModel, VariantBuild, detect_precision

LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
}


@pytest.mark.parametrize("name", ["digits-v1", "digits-v2", "digits-v3", "cytology-v1"])
def test_demo_models_are_fp32(demo_models: dict[str, DemoModel], name: str) -> None:
    assert detect_precision(onnx.load(str(demo_models[name].path))) == "fp32"


def test_each_build_is_detected_as_its_precision(
    v3_builds: dict[str, VariantBuild], cytology_builds: dict[str, VariantBuild]
) -> None:
    for builds in (v3_builds, cytology_builds):
        detected = {
            label: detect_precision(onnx.load_from_string(b.data)) for label, b in builds.items()
        }
        assert detected == {
            "fp32": "fp32",
            "fp16": "fp16",
            "int8-static": "int8",
            "int8-dynamic": "int8-dynamic",
        }


@pytest.mark.parametrize("level", sorted(LEVELS))
@pytest.mark.parametrize("label", ["fp16", "int8-static", "int8-dynamic"])
def test_precision_survives_onnxruntime_graph_optimisations(
    v3_builds: dict[str, VariantBuild], tmp_path: Path, label: str, level: str
) -> None:
    # onnxruntime fuses int8 builds into com.microsoft operators (QGemm,
    # DynamicQuantizeMatMul, ...); a device or tool may hand us such a file.
    optimized = tmp_path / "optimized.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(v3_builds[label].data, options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(optimized))
    assert detect_precision(model) == v3_builds[label].precision
    if label != "fp16" and level == "extended":
        ops = {n.op_type for n in model.graph.node}
        assert ops & {"QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}, ops


def test_fp16_needs_most_weights_in_float16(v3_builds: dict[str, VariantBuild]) -> None:
    # A float32 model with a single float16 constant stays fp32.
    model = onnx.load_from_string(v3_builds["fp32"].data)
    small = onnx.helper.make_tensor("tiny", onnx.TensorProto.FLOAT16, [4], [0.0, 1.0, 2.0, 3.0])
    model.graph.initializer.append(small)
    assert detect_precision(model) == "fp32"
