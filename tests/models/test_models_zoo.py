"""End-to-end tests of the demo models: real training, real ONNX files, real onnxruntime."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models import (
    DEMO_MODEL_NAMES,
    DemoModel,
    build_demo_models,
    load_digits_split,
    measure_accuracy,
    measure_latency,
    open_session,
)
from models.datasets import DigitsSplit
from models.export import SlowRefinement
from models.train import TrainedClassifier, train_logreg, train_mlp
from models.zoo import INDEX_FILENAME

MAX_MODEL_BYTES = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def split() -> DigitsSplit:
    return load_digits_split()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DemoModel]:
    return build_demo_models(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def sessions(built: dict[str, DemoModel]) -> dict[str, ort.InferenceSession]:
    return {
        name: ort.InferenceSession(str(m.path), providers=["CPUExecutionProvider"])
        for name, m in built.items()
    }


@pytest.fixture(scope="module")
def sklearn_models(split: DigitsSplit) -> dict[str, TrainedClassifier]:
    # Retrained independently of the zoo: training is deterministic, so these must be the
    # very estimators whose weights the zoo exported.
    return {"digits-v1": train_logreg(split), "digits-v2": train_mlp(split)}


def test_builds_three_models_with_shared_signature(built: dict[str, DemoModel]) -> None:
    assert tuple(built) == DEMO_MODEL_NAMES
    for name, model in built.items():
        assert model.name == name
        assert model.path.name == f"{name}.onnx"
        assert model.path.stat().st_size == model.size
        assert 0 < model.size <= MAX_MODEL_BYTES
        assert model.input_name == "pixels"
        assert model.input_shape == ("N", 64)
        assert model.output_names == ("probabilities", "label")
    assert not list(built["digits-v1"].path.parent.glob("*.tmp"))


@pytest.mark.parametrize("name", DEMO_MODEL_NAMES)
def test_model_runs_in_onnxruntime(
    sessions: dict[str, ort.InferenceSession], split: DigitsSplit, name: str
) -> None:
    session = sessions[name]
    assert session.get_providers() == ["CPUExecutionProvider"]
    (inp,) = session.get_inputs()
    assert (inp.name, inp.type, inp.shape) == ("pixels", "tensor(float)", ["N", 64])
    outs = session.get_outputs()
    assert [(o.name, o.type, o.shape) for o in outs] == [
        ("probabilities", "tensor(float)", ["N", 10]),
        ("label", "tensor(int64)", ["N"]),
    ]
    for n in (1, 7):
        probs, labels = session.run(None, {"pixels": split.x_holdout[:n]})
        assert probs.shape == (n, 10)
        assert probs.dtype == np.float32
        assert labels.shape == (n,)
        assert labels.dtype == np.int64
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(labels, probs.argmax(axis=1))


@pytest.mark.parametrize("name", DEMO_MODEL_NAMES)
def test_model_metadata(
    built: dict[str, DemoModel], sessions: dict[str, ort.InferenceSession], name: str
) -> None:
    model = built[name]
    proto = onnx.load(str(model.path))
    onnx.checker.check_model(proto)
    assert proto.producer_name == "edgefleet"
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["name"] == name
    assert props["version"]
    assert "load_digits" in props["training_data"]
    assert float(props["holdout_accuracy"]) == pytest.approx(model.holdout_accuracy, abs=1e-6)
    meta = sessions[name].get_modelmeta()
    assert meta.producer_name == "edgefleet"
    assert meta.custom_metadata_map["name"] == name


@pytest.mark.parametrize("name", ["digits-v1", "digits-v2"])
def test_onnx_matches_sklearn(
    built: dict[str, DemoModel],
    sklearn_models: dict[str, TrainedClassifier],
    split: DigitsSplit,
    name: str,
) -> None:
    estimator = sklearn_models[name].estimator
    probs, labels = open_session(built[name].path).run(None, {"pixels": split.x_holdout})
    expected = estimator.predict_proba(split.x_holdout)
    assert np.abs(probs - expected).max() < 1e-4
    np.testing.assert_array_equal(labels, estimator.predict(split.x_holdout))


def test_holdout_accuracies(built: dict[str, DemoModel], split: DigitsSplit) -> None:
    # The slow model's accuracy (~3 s to compute) is taken from the build, which measured it
    # with onnxruntime too; the fast ones are re-measured from the files.
    acc = {name: m.holdout_accuracy for name, m in built.items()}
    for name in ("digits-v1", "digits-v2"):
        measured = measure_accuracy(built[name].path, split.x_holdout, split.y_holdout)
        assert measured == pytest.approx(acc[name])
    assert acc["digits-v1"] > 0.9
    assert acc["digits-v2"] > acc["digits-v1"]
    assert abs(acc["digits-v2-slow"] - acc["digits-v2"]) <= 0.01


def test_slow_model_is_much_slower(built: dict[str, DemoModel], split: DigitsSplit) -> None:
    sample = split.x_holdout[:1]
    fast = measure_latency(built["digits-v2"].path, sample, runs=60, intra_op_threads=1)
    slow = measure_latency(built["digits-v2-slow"].path, sample, runs=25, intra_op_threads=1)
    # Typically ~1000x; 10x leaves room for noisy CI machines.
    assert slow >= 10 * fast, (slow, fast)


def test_slow_block_survives_onnxruntime_optimizations(
    built: dict[str, DemoModel], tmp_path: Path
) -> None:
    optimized = tmp_path / "optimized.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(
        str(built["digits-v2-slow"].path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    nodes = onnx.load(str(optimized), load_external_data=False).graph.node
    matmuls = [n for n in nodes if n.op_type in {"MatMul", "Gemm", "FusedMatMul"}]
    assert len(matmuls) >= SlowRefinement().steps


def test_rebuild_reuses_files(built: dict[str, DemoModel]) -> None:
    out_dir = built["digits-v1"].path.parent
    mtimes = {name: m.path.stat().st_mtime_ns for name, m in built.items()}
    start = time.perf_counter()
    again = build_demo_models(out_dir)
    elapsed = time.perf_counter() - start
    assert again == built
    assert elapsed < 0.5, elapsed  # no training, no export: hashing three files
    assert {name: m.path.stat().st_mtime_ns for name, m in again.items()} == mtimes


def test_rebuilds_stale_or_corrupt_files_identically(
    built: dict[str, DemoModel], tmp_path: Path
) -> None:
    src = built["digits-v1"].path.parent
    out_dir = tmp_path / "copy"
    shutil.copytree(src, out_dir)
    index_path = out_dir / INDEX_FILENAME
    index = json.loads(index_path.read_text())
    index["models"]["digits-v1"]["recipe"]["trainer"]["c"] = 123.0  # recipe changed
    index_path.write_text(json.dumps(index))
    (out_dir / "digits-v2.onnx").write_bytes(b"truncated")  # file damaged
    slow_mtime = (out_dir / "digits-v2-slow.onnx").stat().st_mtime_ns

    rebuilt = build_demo_models(out_dir)

    for name in DEMO_MODEL_NAMES:
        # Deterministic training + export: rebuilt files are byte-identical.
        assert rebuilt[name].sha256 == built[name].sha256
        assert rebuilt[name].path.parent == out_dir
    assert (out_dir / "digits-v2-slow.onnx").stat().st_mtime_ns == slow_mtime
    assert json.loads(index_path.read_text())["models"]["digits-v1"]["recipe"]["trainer"][
        "c"
    ] == pytest.approx(1.0)
