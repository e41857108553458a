"""Serving slots: a real ONNX model in onnxruntime, refused whenever it is not what the
signed release declares or cannot run here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent.runtime import Feed, ModelSlot
from agent.telemetry import TelemetryWindow
from models import INPUT_NAME, DemoModel, DigitsSplit, DigitsStream
from schemas import ArtifactError, Reason, Release, Runtime, TensorSpec


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


def test_release_listing_only_providers_missing_here_is_refused(
    v1_release: Release, v1_path: Path
) -> None:
    available = set(ort.get_available_providers())
    missing = tuple(p for p in ort.get_all_providers() if p not in available)[:3]
    assert missing
    runtime = Runtime(providers=missing)
    error = _refused(v1_release.model_copy(update={"runtime": runtime}), v1_path)
    assert error.reason is Reason.MODEL_LOAD_FAILED


def test_release_preferring_a_missing_provider_falls_back_to_one_present(
    v1_release: Release, v1_path: Path
) -> None:
    missing = next(p for p in ort.get_all_providers() if p not in ort.get_available_providers())
    runtime = Runtime(providers=(missing, "CPUExecutionProvider"))
    slot = ModelSlot(v1_release.model_copy(update={"runtime": runtime}), v1_path)
    assert slot.providers == ("CPUExecutionProvider",)


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
