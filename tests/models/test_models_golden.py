"""Golden vectors made from real held-out rows: a build passes its own set wherever it
runs, and fails the set of any other build, a badly calibrated one, or a tampered set."""

from __future__ import annotations

import hashlib

import numpy as np
import onnxruntime as ort
import pytest

from models import DataSet, VariantBuild, make_golden
from models.golden import MIN_MARGIN, TOLERANCES
from schemas import GoldenSet, Tensor, decode, encode, golden_mismatches
from schemas.golden import MAX_GOLDEN_BYTES
from tests.models.conftest import ort_runner

LABELS = ["fp32", "fp16", "int8-static", "int8-dynamic"]


@pytest.fixture(scope="module")
def v3_golden(v3_builds: dict[str, VariantBuild], digits_holdout: DataSet) -> dict[str, GoldenSet]:
    return {
        label: make_golden(b.data, digits_holdout.x, precision=b.precision, source="digits")
        for label, b in v3_builds.items()
    }


@pytest.fixture(scope="module")
def cytology_golden(
    cytology_builds: dict[str, VariantBuild], cytology_holdout: DataSet
) -> dict[str, GoldenSet]:
    return {
        label: make_golden(b.data, cytology_holdout.x, precision=b.precision)
        for label, b in cytology_builds.items()
    }


def test_golden_set_records_confident_single_rows_spread_over_classes(
    v3_builds: dict[str, VariantBuild],
    v3_golden: dict[str, GoldenSet],
    cytology_golden: dict[str, GoldenSet],
    digits_holdout: DataSet,
) -> None:
    for label, golden in v3_golden.items():
        assert golden.model_sha256 == hashlib.sha256(v3_builds[label].data).hexdigest()
        assert len(golden.cases) == 16
        assert golden.source == "digits"
        assert golden.tolerances == {"probabilities": TOLERANCES[v3_builds[label].precision]}
        labels = set()
        for case in golden.cases:
            pixels = case.inputs["pixels"].array()
            assert pixels.shape == (1, 64)
            # A real held-out row, as it is.
            assert (digits_holdout.x == pixels).all(axis=1).any()
            probs = np.sort(case.outputs["probabilities"].array()[0])
            assert probs[-1] - probs[-2] >= MIN_MARGIN
            (digit,) = case.outputs["label"].array()
            labels.add(int(digit))
        assert labels == set(range(10))
    for golden in cytology_golden.values():
        assert {int(c.outputs["label"].array()[0]) for c in golden.cases} == {0, 1}
        assert golden.cases[0].inputs["features"].array().shape == (1, 30)


def test_golden_files_are_small_and_decode(
    v3_golden: dict[str, GoldenSet], cytology_golden: dict[str, GoldenSet]
) -> None:
    for golden in (*v3_golden.values(), *cytology_golden.values()):
        data = encode(golden)
        assert len(data) < 16 * 1024
        assert decode(data, GoldenSet, max_bytes=MAX_GOLDEN_BYTES) == golden


@pytest.mark.parametrize("label", LABELS)
def test_a_build_passes_its_own_set_under_other_kernels(
    v3_builds: dict[str, VariantBuild],
    cytology_builds: dict[str, VariantBuild],
    v3_golden: dict[str, GoldenSet],
    cytology_golden: dict[str, GoldenSet],
    label: str,
) -> None:
    # Graph optimisations off (unfused MatMul+Add, QDQ run in float) and two threads stand
    # in for another machine's kernels.
    for builds, goldens in ((v3_builds, v3_golden), (cytology_builds, cytology_golden)):
        data = builds[label].data
        for run in (
            ort_runner(data),
            ort_runner(data, threads=2),
            ort_runner(data, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
        ):
            assert golden_mismatches(goldens[label], run) == []


@pytest.mark.parametrize("label", LABELS)
def test_another_build_fails_the_set(
    v3_builds: dict[str, VariantBuild],
    v3_golden: dict[str, GoldenSet],
    cytology_builds: dict[str, VariantBuild],
    cytology_golden: dict[str, GoldenSet],
    label: str,
) -> None:
    # The fp32 set (atol 2e-5) tells every other build apart, and static int8 (calibrated
    # activations) differs from every other build beyond any tolerance. The looser fp16 and
    # int8 tolerances cannot tell fp32, fp16 and dynamic int8 apart: dynamic int8 quantises
    # activations per call and, on these small MLPs, stays within 5e-3 of fp32 on some
    # onnxruntime builds. Only the set's sha256 tells those pairings apart.
    near_float = {"fp32", "fp16", "int8-dynamic"}
    for builds, goldens in ((v3_builds, v3_golden), (cytology_builds, cytology_golden)):
        for other in LABELS:
            if other == label or (label != "fp32" and {label, other} <= near_float):
                continue
            problems = golden_mismatches(goldens[label], ort_runner(builds[other].data))
            assert problems, (label, other)
            assert all("probabilities differs" in p or "label is" in p for p in problems)


def test_badly_calibrated_build_fails_the_int8_set(
    v3_miscalibrated: bytes, v3_golden: dict[str, GoldenSet]
) -> None:
    problems = golden_mismatches(v3_golden["int8-static"], ort_runner(v3_miscalibrated), limit=50)
    assert len(problems) >= 8
    assert any("label is int64" in p for p in problems)


@pytest.mark.parametrize("output", ["probabilities", "label"])
def test_a_tampered_set_fails(
    v3_builds: dict[str, VariantBuild], v3_golden: dict[str, GoldenSet], output: str
) -> None:
    golden = v3_golden["int8-static"]
    case = golden.cases[3]
    expected = case.outputs[output].array().copy()
    if output == "label":
        expected[0] = (expected[0] + 1) % 10
    else:
        expected[0, int(np.argmax(expected[0]))] -= 0.05
    changed = case.model_copy(update={"outputs": {**case.outputs, output: Tensor.of(expected)}})
    tampered = golden.model_copy(update={"cases": (*golden.cases[:3], changed, *golden.cases[4:])})
    (problem,) = golden_mismatches(tampered, ort_runner(v3_builds["int8-static"].data))
    assert problem.startswith(f"case 3: {output}")


def test_make_golden_refuses_bad_requests(
    v3_builds: dict[str, VariantBuild], digits_holdout: DataSet, cytology_holdout: DataSet
) -> None:
    data = v3_builds["fp32"].data
    with pytest.raises(ValueError, match="cases must be between"):
        make_golden(data, digits_holdout.x, precision="fp32", cases=0)
    with pytest.raises(ValueError, match="cases must be between"):
        make_golden(data, digits_holdout.x[:3], precision="fp32", cases=4)
    with pytest.raises(ValueError, match="does not fit input 'pixels'"):
        make_golden(data, cytology_holdout.x, precision="fp32")
    with pytest.raises(ValueError, match="does not load"):
        make_golden(b"junk", digits_holdout.x, precision="fp32")
