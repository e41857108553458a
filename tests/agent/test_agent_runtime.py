"""Serving slots: a real ONNX model in onnxruntime, refused whenever it is not what the
signed release declares or cannot run here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent.providers import open_session
from agent.runtime import Feed, ModelSlot, read_golden
from agent.telemetry import TelemetryWindow
from models import INPUT_NAME, DemoModel, DigitsSplit, DigitsStream
from models.export import LABEL_OUTPUT, PROBABILITIES_OUTPUT
from schemas import (
    ArtifactError,
    ArtifactRef,
    GoldenSet,
    Reason,
    Release,
    Runtime,
    Tensor,
    TensorSpec,
    encode,
)
from tests.agent.goldens import TOLERANCE, golden_for, with_output


@pytest.fixture
def v1_path(demo_models: dict[str, DemoModel]) -> Path:
    return demo_models["digits-v1"].path


def _refused(release: Release, path: Path) -> ArtifactError:
    with pytest.raises(ArtifactError) as caught:
        ModelSlot(release, path)
    return caught.value


def test_slot_serves_digits_v1_on_real_digits(
    v1_release: Release, v1_path: Path, digits_split: DigitsSplit
) -> None:
    slot = ModelSlot(v1_release, v1_path)
    assert slot.providers == ("CPUExecutionProvider",)
    stream = DigitsStream(digits_split, seed=3)
    correct = 0
    for _ in range(50):
        result = slot.run({INPUT_NAME: next(stream)})
        assert result.label is not None
        assert 0 <= result.label <= 9
        assert result.confidence is not None
        assert 0.0 <= result.confidence <= 1.0
        assert result.latency_ms > 0.0
        correct += result.label == stream.last_label
    assert correct >= 40  # digits-v1 is ~95 % accurate on held-out digits


def test_release_declaring_other_inputs_is_refused(v1_release: Release, v1_path: Path) -> None:
    pixels = v1_release.inputs[0]
    lies = {
        "renamed input": (pixels.model_copy(update={"name": "image"}),),
        "other dtype": (pixels.model_copy(update={"dtype": "float64"}),),
        "extra input": (pixels, TensorSpec(name="mask", dtype="float32", shape=("N", 64))),
    }
    for label, inputs in lies.items():
        error = _refused(v1_release.model_copy(update={"inputs": inputs}), v1_path)
        assert error.reason is Reason.MODEL_LOAD_FAILED, label


def test_release_declaring_an_output_the_model_lacks_is_refused(
    v1_release: Release, v1_path: Path
) -> None:
    outputs = (*v1_release.outputs, TensorSpec(name="boxes", dtype="float32", shape=("N", 4)))
    error = _refused(v1_release.model_copy(update={"outputs": outputs}), v1_path)
    assert error.reason is Reason.MODEL_LOAD_FAILED


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_broken_onnx_file_is_refused(
    v1_release: Release, v1_path: Path, tmp_path: Path, damage: str
) -> None:
    data = v1_path.read_bytes()
    broken = {"truncated": data[: len(data) // 2], "garbage": b"\x8f not onnx" * 50, "empty": b""}
    path = tmp_path / "model.onnx"
    path.write_bytes(broken[damage])
    assert _refused(v1_release, path).reason is Reason.MODEL_LOAD_FAILED


def _missing_providers() -> tuple[str, ...]:
    available = set(ort.get_available_providers())
    missing = tuple(p for p in ort.get_all_providers() if p not in available)[:3]
    assert missing
    return missing


def test_release_listing_only_providers_missing_here_serves_degraded_on_cpu(
    v1_release: Release, v1_path: Path
) -> None:
    missing = _missing_providers()
    slot = ModelSlot(v1_release.model_copy(update={"runtime": Runtime(providers=missing)}), v1_path)
    assert slot.providers == ("CPUExecutionProvider",)
    assert slot.fallback is not None
    assert f"{missing[0]}: not in this onnxruntime build" in slot.fallback
    assert slot.fallback.endswith("serving on CPUExecutionProvider")
    assert slot.run(slot.blank_feed()).label is not None


def test_release_refusing_a_fallback_does_not_load_on_cpu(
    v1_release: Release, v1_path: Path
) -> None:
    runtime = Runtime(
        providers=(*_missing_providers(), "CPUExecutionProvider"), on_fallback="refuse"
    )
    error = _refused(v1_release.model_copy(update={"runtime": runtime}), v1_path)
    assert error.reason is Reason.MODEL_LOAD_FAILED
    assert "refuses a fallback" in error.detail


def test_release_preferring_a_missing_provider_falls_back_to_one_present(
    v1_release: Release, v1_path: Path
) -> None:
    missing = next(p for p in ort.get_all_providers() if p not in ort.get_available_providers())
    runtime = Runtime(providers=(missing, "CPUExecutionProvider"))
    slot = ModelSlot(v1_release.model_copy(update={"runtime": runtime}), v1_path)
    assert slot.providers == ("CPUExecutionProvider",)
    assert slot.fallback is not None
    assert missing in slot.fallback


def test_first_choice_provider_serves_without_fallback(v1_release: Release, v1_path: Path) -> None:
    slot = ModelSlot(v1_release, v1_path)
    assert v1_release.runtime.providers[0] == "CPUExecutionProvider"
    assert slot.fallback is None


def test_device_providers_override_the_release(v1_release: Release, v1_path: Path) -> None:
    runtime = Runtime(providers=(*_missing_providers(), "CPUExecutionProvider"))
    release = v1_release.model_copy(update={"runtime": runtime})
    slot = ModelSlot(release, v1_path, providers=("CPUExecutionProvider",))
    assert slot.fallback is None


def test_a_provider_that_fails_to_open_the_model_is_passed_over(v1_path: Path) -> None:
    # onnxruntime is told a provider exists that it cannot start: it falls back to the
    # CPU on its own, which counts as that provider failing.
    options = ort.SessionOptions()
    wanted = ("BogusExecutionProvider", "CPUExecutionProvider")
    opened = open_session(v1_path, options, wanted, available=wanted)
    assert opened.provider == "CPUExecutionProvider"
    assert opened.fallback is not None
    assert opened.fallback.startswith("BogusExecutionProvider: ")


def test_a_model_no_provider_opens_is_refused_saying_what_each_answered(tmp_path: Path) -> None:
    path = tmp_path / "not-a-model.onnx"
    path.write_bytes(b"\x08\x07not an onnx graph")
    with pytest.raises(ArtifactError) as caught:
        open_session(path, ort.SessionOptions(), ("CPUExecutionProvider",))
    assert caught.value.reason is Reason.MODEL_LOAD_FAILED
    assert caught.value.detail.startswith("CPUExecutionProvider: ")


def test_wrong_input_shape_fails_the_inference_and_counts_as_an_error(
    v1_release: Release, v1_path: Path, digits_split: DigitsSplit
) -> None:
    slot = ModelSlot(v1_release, v1_path)
    window = TelemetryWindow("dev-0001", started=0.0)
    sample = next(DigitsStream(digits_split))
    wrong: list[Feed] = [
        {INPUT_NAME: sample[:, :63]},
        {INPUT_NAME: sample.reshape(8, 8)},
        {INPUT_NAME: sample.astype(np.float64)},
        {"image": sample},
    ]
    for feed in wrong:
        with pytest.raises(ValueError, match="inference failed"):
            slot.run(feed)
        window.record(v1_release.release_id, None)
    window.record(v1_release.release_id, slot.run({INPUT_NAME: sample}))

    summary = window.close(1.0)
    assert (summary.count, summary.errors, summary.latency_ms.count) == (5, 4, 1)


def test_self_test_on_a_bad_input_fails_with_self_test_failed(
    v1_release: Release, v1_path: Path, digits_split: DigitsSplit
) -> None:
    slot = ModelSlot(v1_release, v1_path)
    slot.self_test({INPUT_NAME: next(DigitsStream(digits_split))})
    with pytest.raises(ArtifactError) as caught:
        slot.self_test({INPUT_NAME: np.zeros((1, 10), dtype=np.float32)})
    assert caught.value.reason is Reason.SELF_TEST_FAILED


# -- golden self-tests: the model must reproduce the outputs it was published with ------


@pytest.fixture(scope="module")
def v1_golden(demo_models: dict[str, DemoModel], digits_split: DigitsSplit) -> GoldenSet:
    return golden_for(demo_models["digits-v1"], digits_split)


@pytest.fixture
def v1_slot(v1_release: Release, v1_path: Path) -> ModelSlot:
    return ModelSlot(v1_release, v1_path)


def _self_test_failure(slot: ModelSlot, golden: GoldenSet) -> str:
    with pytest.raises(ArtifactError) as caught:
        slot.self_test(golden)
    assert caught.value.reason is Reason.SELF_TEST_FAILED
    return caught.value.detail


def _probabilities(golden: GoldenSet, case: int) -> np.ndarray:
    return np.array(golden.cases[case].outputs[PROBABILITIES_OUTPUT].array())


def test_golden_sets_made_with_each_model_pass_its_self_test(
    v1_slot: ModelSlot,
    v2_slot: ModelSlot,
    v1_golden: GoldenSet,
    demo_models: dict[str, DemoModel],
    digits_split: DigitsSplit,
) -> None:
    assert len(v1_golden.cases) == 9  # eight single digits and a batch of them
    v1_slot.self_test(v1_golden)
    v2_slot.self_test(golden_for(demo_models["digits-v2"], digits_split))


def test_probability_off_by_more_than_its_tolerance_fails_naming_case_and_output(
    v1_slot: ModelSlot, v1_golden: GoldenSet
) -> None:
    label = int(v1_golden.cases[3].outputs[LABEL_OUTPUT].array()[0])
    within = _probabilities(v1_golden, 3)
    within[0, label] += TOLERANCE.atol / 2
    v1_slot.self_test(with_output(v1_golden, 3, PROBABILITIES_OUTPUT, Tensor.of(within)))

    beyond = _probabilities(v1_golden, 3)
    beyond[0, label] -= 0.01
    detail = _self_test_failure(
        v1_slot, with_output(v1_golden, 3, PROBABILITIES_OUTPUT, Tensor.of(beyond))
    )
    assert "case 3: probabilities differs by up to 0.01" in detail
    assert "case 2" not in detail
    assert "case 4" not in detail


def test_changed_label_fails_exactly(v1_slot: ModelSlot, v1_golden: GoldenSet) -> None:
    labels = np.array(v1_golden.cases[5].outputs[LABEL_OUTPUT].array())
    labels[0] = (labels[0] + 1) % 10
    detail = _self_test_failure(v1_slot, with_output(v1_golden, 5, LABEL_OUTPUT, Tensor.of(labels)))
    assert "case 5: label is" in detail
    assert "case 4" not in detail
    assert "case 6" not in detail


def test_golden_set_naming_another_model_fails_before_running(
    v1_slot: ModelSlot, v1_golden: GoldenSet, demo_models: dict[str, DemoModel]
) -> None:
    other = demo_models["digits-v2"].sha256
    detail = _self_test_failure(v1_slot, v1_golden.model_copy(update={"model_sha256": other}))
    assert detail == (
        f"golden set made for model {other[:12]}, not {v1_slot.release.artifact.sha256[:12]}"
    )


def test_digits_v1_golden_set_fails_against_digits_v2(
    v2_slot: ModelSlot, v1_golden: GoldenSet
) -> None:
    assert "golden set made for model" in _self_test_failure(v2_slot, v1_golden)
    # Even relabelled for v2, v1's outputs are not v2's: the comparison catches it.
    relabelled = v1_golden.model_copy(update={"model_sha256": v2_slot.release.artifact.sha256})
    detail = _self_test_failure(v2_slot, relabelled)
    assert "case 0: probabilities differs by up to" in detail


def test_model_failing_on_a_golden_input_fails_the_self_test(
    v1_slot: ModelSlot, v1_golden: GoldenSet
) -> None:
    case = v1_golden.cases[2]
    narrow = np.zeros((1, 63), dtype=np.float32)
    broken = case.model_copy(update={"inputs": {INPUT_NAME: Tensor.of(narrow)}})
    cases = (*v1_golden.cases[:2], broken, *v1_golden.cases[3:])
    detail = _self_test_failure(v1_slot, v1_golden.model_copy(update={"cases": cases}))
    assert detail.startswith("golden case 2: inference failed")


def test_golden_file_reads_back_and_anything_else_is_malformed(
    v1_golden: GoldenSet, tmp_path: Path
) -> None:
    path = tmp_path / "golden.msgpack"
    path.write_bytes(encode(v1_golden))
    assert read_golden(path) == v1_golden
    others = {
        "garbage": b"\xc1 not msgpack",
        "another message": encode(ArtifactRef(sha256="0" * 64, size=1)),
        "truncated": encode(v1_golden)[:-100],
    }
    for label, data in others.items():
        path.write_bytes(data)
        with pytest.raises(ArtifactError) as caught:
            read_golden(path)
        assert caught.value.reason is Reason.MALFORMED, label
        assert caught.value.detail.startswith("golden set does not decode: "), label
