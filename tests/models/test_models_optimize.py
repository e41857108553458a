"""fp16/int8 builds of real models, and release bundles written and read back."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models import (
    Classifier,
    DataSet,
    DemoModel,
    ReleaseBundle,
    VariantBuild,
    build_variants,
    format_bundle,
    read_bundle,
)
from models.optimize import BUNDLE_FILENAME, optimize
from schemas import GoldenSet, UsageError, decode
from schemas.golden import MAX_GOLDEN_BYTES

LABELS = ["fp32", "fp16", "int8-static", "int8-dynamic"]


def _io(data: bytes) -> list[tuple[str, str]]:
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return [(a.name, a.type) for a in (*session.get_inputs(), *session.get_outputs())]


@pytest.mark.parametrize("model", ["digits-v3", "cytology-v1"])
def test_builds_keep_the_models_inputs_and_outputs(
    demo_models: dict[str, DemoModel],
    v3_builds: dict[str, VariantBuild],
    cytology_builds: dict[str, VariantBuild],
    model: str,
) -> None:
    builds = v3_builds if model == "digits-v3" else cytology_builds
    original = demo_models[model].path.read_bytes()
    assert list(builds) == LABELS
    assert builds["fp32"].data == original
    input_name = demo_models[model].input_name
    for build in builds.values():
        assert _io(build.data) == [
            (input_name, "tensor(float)"),
            ("probabilities", "tensor(float)"),
            ("label", "tensor(int64)"),
        ], build.label
        if build.label != "fp32":
            props = {p.key: p.value for p in onnx.load_from_string(build.data).metadata_props}
            assert props["variant"] == build.label
            assert props["name"] == model
            assert "holdout_accuracy" not in props  # the source's, not this build's


def test_int8_builds_of_digits_v3_are_four_times_smaller_and_as_accurate(
    v3_builds: dict[str, VariantBuild], digits_holdout: DataSet
) -> None:
    fp32 = len(v3_builds["fp32"].data)
    assert len(v3_builds["fp16"].data) < 0.55 * fp32
    for label in ("int8-static", "int8-dynamic"):
        assert len(v3_builds[label].data) * 3.5 < fp32, label
    assert digits_holdout.y is not None
    accuracy = {
        label: Classifier(b.data).accuracy(digits_holdout.x, digits_holdout.y)
        for label, b in v3_builds.items()
    }
    for label in LABELS[1:]:
        assert accuracy[label] >= accuracy["fp32"] - 0.01, accuracy


def test_int8_static_build_is_reproducible(
    demo_models: dict[str, DemoModel],
    v3_builds: dict[str, VariantBuild],
    digits_calibration: DataSet,
) -> None:
    (again,) = build_variants(
        demo_models["digits-v3"].path.read_bytes(), digits_calibration, precisions=["int8"]
    )
    assert again.data == v3_builds["int8-static"].data


def test_building_logs_and_warns_nothing_above_debug(
    demo_models: dict[str, DemoModel],
    cytology_calibration: DataSet,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # pytest turns warnings into errors here; the quantisation tools' root-logger chatter
    # must not reach the operator's console either.
    caplog.set_level(logging.DEBUG)
    build_variants(
        demo_models["cytology-v1"].path.read_bytes(),
        cytology_calibration,
        precisions=["int8", "int8-dynamic", "fp16"],
    )
    loud = [r for r in caplog.records if r.levelno > logging.DEBUG]
    assert loud == []
    assert any(r.name == "models.optimize" for r in caplog.records)


def test_refuses_what_it_cannot_build(
    demo_models: dict[str, DemoModel], digits_calibration: DataSet, cytology_calibration: DataSet
) -> None:
    v3 = demo_models["digits-v3"].path.read_bytes()
    with pytest.raises(ValueError, match="not an ONNX model"):
        build_variants(b"\x08\x07garbage", digits_calibration, precisions=["int8"])
    with pytest.raises(ValueError, match=r"\(256, 30\) does not fit input 'pixels'"):
        build_variants(v3, cytology_calibration, precisions=["int8"])
    with pytest.raises(ValueError, match="precisions must be some of"):
        build_variants(v3, digits_calibration, precisions=["int4"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="precisions must be some of"):
        build_variants(v3, digits_calibration, precisions=[])
    (int8,) = build_variants(v3, digits_calibration, precisions=["int8"])
    with pytest.raises(ValueError, match="built from an fp32 model, this one computes in int8"):
        build_variants(int8.data, digits_calibration, precisions=["int8-dynamic"])


@pytest.fixture(scope="module")
def bundle(
    demo_models: dict[str, DemoModel],
    digits_calibration: DataSet,
    digits_holdout: DataSet,
    tmp_path_factory: pytest.TempPathFactory,
) -> ReleaseBundle:
    return optimize(
        demo_models["digits-v3"].path,
        digits_calibration,
        digits_holdout,
        precisions=("int8-dynamic", "fp32", "int8", "fp16"),
        out_dir=tmp_path_factory.mktemp("v3-bundle"),
    )


def test_optimize_writes_a_bundle_that_reads_back(
    bundle: ReleaseBundle, v3_builds: dict[str, VariantBuild], digits_holdout: DataSet
) -> None:
    assert bundle.name == "digits-v3"
    assert [v.label for v in bundle.variants] == LABELS
    folder = bundle.variants[0].file.parent
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [BUNDLE_FILENAME]
        + [f"digits-v3.{label}.onnx" for label in LABELS]
        + [f"digits-v3.{label}.golden" for label in LABELS]
    )
    assert read_bundle(folder) == bundle
    assert digits_holdout.y is not None
    for v in bundle.variants:
        data = v.file.read_bytes()
        assert data == v3_builds[v.label].data
        assert v.size == len(data)
        assert v.accuracy == Classifier(data).accuracy(digits_holdout.x, digits_holdout.y)
        assert 0.0 < v.p50_ms <= v.p95_ms
        golden = v.golden.read_bytes()
        assert len(golden) == v.golden_size < 256 * 1024
        decoded = decode(golden, GoldenSet, max_bytes=MAX_GOLDEN_BYTES)
        assert decoded.model_sha256 == v.sha256
        assert "digits.npz" in decoded.source
    table = format_bundle(bundle).splitlines()
    assert table[0] == "digits-v3"
    assert table[1].split() == ["label", "precision", "size", "accuracy", "p50", "ms", "p95", "ms"]
    assert [line.split()[0] for line in table[2:]] == LABELS
    assert "4.51 MB" in table[2]


def test_a_tampered_bundle_file_is_refused(bundle: ReleaseBundle, tmp_path: Path) -> None:
    folder = bundle.variants[0].file.parent
    for name in [BUNDLE_FILENAME] + [p.name for v in bundle.variants for p in (v.file, v.golden)]:
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    assert read_bundle(tmp_path).name == "digits-v3"

    target = tmp_path / "digits-v3.int8-static.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="changed since it was written") as refused:
        read_bundle(tmp_path)
    assert str(target) in str(refused.value)

    target.unlink()
    with pytest.raises(UsageError, match="cannot be read"):
        read_bundle(tmp_path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda doc: doc.pop("variants"), "variants"),
        (lambda doc: doc["variants"][0].update(file="../escape.onnx"), "variants.0.file"),
        (lambda doc: doc["variants"][1].update(sha256="00"), "variants.1.sha256"),
        (lambda doc: doc.update(schema_version=2), "schema_version"),
    ],
)
def test_a_garbled_bundle_json_is_refused(
    bundle: ReleaseBundle, tmp_path: Path, edit: Callable[[dict[str, Any]], object], message: str
) -> None:
    doc = json.loads((bundle.variants[0].file.parent / BUNDLE_FILENAME).read_text())
    edit(doc)
    (tmp_path / BUNDLE_FILENAME).write_text(json.dumps(doc))
    with pytest.raises(UsageError, match=f"not a release bundle: {message}"):
        read_bundle(tmp_path)


def test_a_missing_or_unparsable_bundle_json_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read"):
        read_bundle(tmp_path)
    (tmp_path / BUNDLE_FILENAME).write_text("{not json")
    with pytest.raises(UsageError, match="not a release bundle"):
        read_bundle(tmp_path)


def test_optimize_refuses_bad_names_and_unlabelled_holdout(
    demo_models: dict[str, DemoModel], cytology_calibration: DataSet, tmp_path: Path
) -> None:
    model = demo_models["cytology-v1"].path
    with pytest.raises(UsageError, match="not a release name"):
        optimize(
            model,
            cytology_calibration,
            cytology_calibration,
            precisions=["fp32"],
            out_dir=tmp_path,
            name="../x",
        )
    with pytest.raises(ValueError, match="has no labels"):
        optimize(
            model, cytology_calibration, cytology_calibration, precisions=["fp32"], out_dir=tmp_path
        )
    digits = DataSet(np.ones((4, 64), np.float32), np.zeros(4, np.int64), "digits-shaped")
    with pytest.raises(ValueError, match=r"held-out data digits-shaped of shape \(4, 64\)"):
        optimize(model, cytology_calibration, digits, precisions=["fp32"], out_dir=tmp_path)
    with pytest.raises(UsageError, match="cannot read model"):
        optimize(
            tmp_path / "missing.onnx",
            cytology_calibration,
            DataSet(
                cytology_calibration.x, np.zeros(len(cytology_calibration.x), np.int64), "zeros"
            ),
            precisions=["fp32"],
            out_dir=tmp_path,
        )
    assert not list(tmp_path.iterdir())
