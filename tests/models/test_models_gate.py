"""The accuracy gate on real held-out digits: good int8 builds pass, a badly calibrated
one is refused, and data that does not fit is an error, not a verdict."""

from __future__ import annotations

import onnx
import pytest

from models import (
    Classifier,
    DataSet,
    VariantBuild,
    check_candidate,
    format_report,
)


def test_good_int8_builds_pass_against_the_fp32_baseline(
    v3_builds: dict[str, VariantBuild], digits_holdout: DataSet
) -> None:
    fp32 = v3_builds["fp32"].data
    for label in ("int8-static", "int8-dynamic", "fp16"):
        candidate = v3_builds[label].data
        report = check_candidate(candidate, digits_holdout, baseline=fp32)
        assert report.passed, report.problems
        assert report.samples == 540
        assert report.baseline is not None
        assert report.candidate.size == len(candidate)
        assert report.baseline.size == len(fp32)
        assert digits_holdout.y is not None
        assert report.candidate.accuracy == Classifier(candidate).accuracy(
            digits_holdout.x, digits_holdout.y
        )
        assert report.agreement is not None
        assert report.agreement >= 0.98
        assert report.candidate.p50_ms is None  # latency only on request
        lines = format_report(report).splitlines()
        assert lines[-1] == "PASS"
        assert lines[0].split()[:3] == ["model", "accuracy", "agreement"]
        assert lines[1].startswith("candidate")
        assert lines[2].startswith("baseline")


def test_badly_calibrated_int8_build_is_refused(
    v3_builds: dict[str, VariantBuild], v3_miscalibrated: bytes, digits_holdout: DataSet
) -> None:
    fp32 = v3_builds["fp32"].data
    good = check_candidate(v3_builds["int8-static"].data, digits_holdout, baseline=fp32)
    bad = check_candidate(v3_miscalibrated, digits_holdout, baseline=fp32)
    assert bad.baseline is not None
    drop = (bad.baseline.accuracy - bad.candidate.accuracy) * 100
    # Same graph, same size, same precision as the good build: only the scales differ,
    # and they cost many points.
    assert len(v3_miscalibrated) == len(v3_builds["int8-static"].data)
    assert drop > 10.0
    assert good.candidate.accuracy - bad.candidate.accuracy > 0.1
    assert not bad.passed
    (problem,) = bad.problems
    assert f"{bad.candidate.accuracy * 100:.2f}%" in problem
    assert f"{bad.baseline.accuracy * 100:.2f}%" in problem
    assert f"{drop:.2f} points below" in problem
    assert "allowed drop: 1 points" in problem
    assert format_report(bad).splitlines()[-1] == f"FAIL: {problem}"

    # The threshold is the allowed drop, exactly.
    assert check_candidate(
        v3_miscalibrated, digits_holdout, baseline=fp32, max_drop_points=drop
    ).passed
    assert not check_candidate(
        v3_miscalibrated, digits_holdout, baseline=fp32, max_drop_points=drop - 0.1
    ).passed


def test_minimum_accuracy_applies_with_or_without_a_baseline(
    v3_builds: dict[str, VariantBuild], digits_holdout: DataSet
) -> None:
    fp32 = v3_builds["fp32"].data
    alone = check_candidate(fp32, digits_holdout, min_accuracy=0.95)
    assert alone.passed
    assert alone.baseline is None
    assert alone.agreement is None
    strict = check_candidate(fp32, digits_holdout, min_accuracy=0.99)
    (problem,) = strict.problems
    assert problem == (
        f"accuracy {strict.candidate.accuracy * 100:.2f}% is below the minimum of 99.00%"
    )
    lines = format_report(strict).splitlines()
    assert len(lines) == 3  # header, candidate, verdict
    assert lines[-1].startswith("FAIL: accuracy")


def test_latency_is_measured_on_request(
    v3_builds: dict[str, VariantBuild],
    cytology_builds: dict[str, VariantBuild],
    digits_holdout: DataSet,
    cytology_holdout: DataSet,
) -> None:
    report = check_candidate(
        v3_builds["int8-static"].data,
        digits_holdout,
        baseline=v3_builds["fp32"].data,
        latency_runs=50,
    )
    assert report.baseline is not None
    for score in (report.candidate, report.baseline):
        assert score.p50_ms is not None
        assert score.p95_ms is not None
        assert 0.0 < score.p50_ms <= score.p95_ms < 50.0
    cytology = check_candidate(cytology_builds["fp32"].data, cytology_holdout, latency_runs=20)
    assert cytology.candidate.p50_ms is not None
    assert cytology.samples == 171
    row = format_report(cytology).splitlines()[1].split()
    assert row[0] == "candidate"
    assert row[3] == f"{cytology.candidate.p50_ms:.3f}"


def test_labels_come_from_class_scores_when_a_model_has_no_label_output(
    v3_builds: dict[str, VariantBuild], digits_holdout: DataSet
) -> None:
    model = onnx.load_from_string(v3_builds["fp32"].data)
    kept = [o for o in model.graph.output if o.name != "label"]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    scores_only = model.SerializeToString()
    assert Classifier(scores_only).label_output is None
    report = check_candidate(scores_only, digits_holdout, baseline=v3_builds["fp32"].data)
    assert report.agreement == 1.0
    assert report.baseline is not None
    assert report.candidate.accuracy == report.baseline.accuracy


def test_data_that_does_not_fit_is_an_error(
    v3_builds: dict[str, VariantBuild],
    cytology_builds: dict[str, VariantBuild],
    digits_holdout: DataSet,
    cytology_holdout: DataSet,
    digits_calibration: DataSet,
) -> None:
    v3 = v3_builds["fp32"].data
    with pytest.raises(ValueError, match=r"candidate: .* \(171, 30\) does not fit input 'pixels'"):
        check_candidate(v3, cytology_holdout)
    with pytest.raises(ValueError, match=r"baseline: .* \(540, 64\) does not fit input 'features'"):
        check_candidate(v3, digits_holdout, baseline=cytology_builds["fp32"].data)
    with pytest.raises(ValueError, match="has no labels"):
        check_candidate(v3, digits_calibration)
    with pytest.raises(ValueError, match="candidate: model does not load"):
        check_candidate(b"not a model", digits_holdout)
    with pytest.raises(ValueError, match="baseline: model does not load"):
        check_candidate(v3, digits_holdout, baseline=v3[:1000])
    with pytest.raises(ValueError, match="min_accuracy is a fraction"):
        check_candidate(v3, digits_holdout, min_accuracy=97.0)
    with pytest.raises(ValueError, match="max_drop_points must be >= 0"):
        check_candidate(v3, digits_holdout, max_drop_points=-1.0)


def test_models_without_a_dynamic_batch_are_refused(
    v3_builds: dict[str, VariantBuild], digits_holdout: DataSet
) -> None:
    model = onnx.load_from_string(v3_builds["fp32"].data)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    with pytest.raises(ValueError, match="candidate: input 'pixels' of shape \\[1, 64\\] has no"):
        check_candidate(model.SerializeToString(), digits_holdout)
