"""``edgefleet model optimize`` and ``edgefleet model validate`` as an operator runs them,
on the real digits-v3 and its data set file."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.cli import main
from models import DemoModel
from models.datafile import DataSet, load_dataset
from models.optimize import build_variants, read_bundle


def test_optimize_writes_per_class_variants_and_says_which_class_takes_which(
    demo_models: dict[str, DemoModel], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    v3 = demo_models["digits-v3"]
    out = tmp_path / "v3"
    code = main(
        ["model", "optimize", str(v3.path), "--calibration", str(v3.dataset), "--out", str(out)]
    )
    assert code == 0
    text = capsys.readouterr().out
    bundle = read_bundle(out)
    labels = {v.label for v in bundle.variants}
    # The shipped profiles run fp16 (Jetson, GPU gateway) and both int8 kinds (Intel).
    assert labels == {"fp32", "fp16", "int8-static", "int8-dynamic"}
    for variant in bundle.variants:
        assert variant.label in text
        assert variant.file.exists()
        assert variant.golden.exists()
    plan = {
        line.split()[0]: line.split(maxsplit=1)[1]
        for line in text.splitlines()
        if line.startswith("  ") and line.split()[0].count("-") >= 2
    }
    assert plan["jetson-vision-standard"].startswith("fp16 (accuracy ")
    assert plan["intel-lowpower-detector"].startswith("int8-static (accuracy ")
    assert plan["factory-gateway-gpu"].startswith("fp16 (accuracy ")
    # The carts gate on the cytology data set (found beside digits.npz): a digits model
    # does not even fit its input.
    assert plan["medical-cart-cpu"].startswith("no variant passes the gate; gate refused fp32")
    assert "does not fit input 'pixels'" in plan["medical-cart-cpu"]


def test_validate_passes_a_good_int8_build_and_fails_a_badly_calibrated_one(
    demo_models: dict[str, DemoModel], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    v3 = demo_models["digits-v3"]
    calibration = load_dataset(v3.dataset, "calibration")
    (good,) = build_variants(v3.path.read_bytes(), calibration, precisions=["int8"])
    wrong = DataSet(x=calibration.x * 100.0, y=None, source="calibration x100")
    (bad,) = build_variants(v3.path.read_bytes(), wrong, precisions=["int8"])
    (tmp_path / "good.onnx").write_bytes(good.data)
    (tmp_path / "bad.onnx").write_bytes(bad.data)

    def validate(candidate: str) -> tuple[int, str]:
        code = main(
            [
                "model",
                "validate",
                str(tmp_path / candidate),
                "--baseline",
                str(v3.path),
                "--data",
                str(v3.dataset),
                "--max-drop",
                "1.0",
                "--runs",
                "50",
            ]
        )
        return code, capsys.readouterr().out

    code, text = validate("good.onnx")
    assert code == 0, text
    assert text.splitlines()[-1] == "PASS"
    for column in ("accuracy", "agreement", "p50 ms", "p95 ms", "size"):
        assert column in text
    code, text = validate("bad.onnx")
    assert code == 1
    assert text.splitlines()[-1].startswith("FAIL: ")


def test_validate_with_data_that_does_not_fit_the_model_is_a_usage_error(
    demo_models: dict[str, DemoModel], capsys: pytest.CaptureFixture[str]
) -> None:
    v3, cytology = demo_models["digits-v3"], demo_models["cytology-v1"]
    code = main(["model", "validate", str(v3.path), "--data", str(cytology.dataset)])
    assert code == 2
    assert "edgefleet: " in capsys.readouterr().err
