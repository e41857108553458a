"""``rollout plan``'s variant and accuracy gate per class, run on real models and held-out
data as the coordinator runs them; and why, when they cannot run here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from coordinator.operator import VariantFile, describe_candidate
from coordinator.profiles import ClassProfile
from edgefleet.compose import SpecOptions, prepare_candidate, rollout_spec
from edgefleet.plancli import class_offers
from models import DemoModel
from models.datafile import load_dataset
from models.optimize import build_variants
from schemas import Release, RolloutSpec, WaveSpec

CAM = "jetson-vision-standard"


def _profile(**gate: Any) -> dict[str, ClassProfile]:
    return {
        CAM: ClassProfile.model_validate(
            {
                "name": CAM,
                "providers": ["CPUExecutionProvider"],
                "precisions": ["fp16", "fp32"],
                "max_model_bytes": 10_000_000,
                "gate": {"dataset": "digits", "max_drop_points": 1.0} | gate,
                "health": {
                    "max_error_rate": 0.01,
                    "p95_latency_ms": 10.0,
                    "min_inferences": 20,
                    "soak_seconds": 1.0,
                },
            }
        )
    }


@pytest.fixture(scope="module")
def variants(demo_models: dict[str, DemoModel], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits-v2 as fp32 and fp16 files in a folder of their own (no golden sets)."""
    v2 = demo_models["digits-v2"]
    folder = tmp_path_factory.mktemp("variants")
    (fp16,) = build_variants(
        v2.path.read_bytes(), load_dataset(v2.dataset, "calibration"), precisions=["fp16"]
    )
    (folder / "fp16.onnx").write_bytes(fp16.data)
    return folder


def _build(
    files: list[VariantFile], profiles: dict[str, ClassProfile]
) -> tuple[RolloutSpec, list[VariantFile]]:
    candidate = describe_candidate("digits-v2", files, profiles, (CAM,))
    options = SpecOptions(waves=(WaveSpec(percent=100.0),))
    return rollout_spec("r", (CAM,), candidate, options, issued_at=0.0), files


def _files(demo_models: dict[str, DemoModel], variants: Path) -> list[VariantFile]:
    return [
        VariantFile("fp32", demo_models["digits-v2"].path.read_bytes()),
        VariantFile("fp16", (variants / "fp16.onnx").read_bytes()),
    ]


def _stable(model: DemoModel) -> Release:
    """``model`` as the release a class runs now."""
    candidate, _ = prepare_candidate(model.path, None, _profile(), (CAM,))
    (variant,) = candidate.variants
    return _profile()[CAM].release(model.name, variant)


def test_without_data_sets_the_gate_is_not_run_and_the_plan_says_why(
    demo_models: dict[str, DemoModel], variants: Path
) -> None:
    spec, files = _build(_files(demo_models, variants), _profile())
    offer = class_offers(spec, files, _profile(), {}, datasets_dir=None)[CAM]
    assert offer.variant is None  # fp16 or fp32: only the gate could tell
    assert offer.pull_bytes is None
    assert offer.refusal is None
    assert offer.gate.startswith("not run here: no data sets are configured")
    assert offer.gate.endswith("the coordinator takes the first of fp16, fp32 that passes")


def test_with_the_data_set_the_gate_picks_the_first_passing_variant(
    demo_models: dict[str, DemoModel], variants: Path
) -> None:
    v2 = demo_models["digits-v2"]
    spec, files = _build(_files(demo_models, variants), _profile())
    offer = class_offers(spec, files, _profile(), {}, datasets_dir=v2.dataset.parent)[CAM]
    fp16 = (variants / "fp16.onnx").stat().st_size
    assert (offer.variant, offer.pull_bytes, offer.refusal) == ("fp16", fp16, None)
    assert offer.release is not None
    assert offer.release.startswith("digits-v2:fp16@")
    assert offer.gate.startswith("passed: accuracy ")
    assert "held-out samples" in offer.gate


def test_against_a_stable_release_the_gate_needs_its_model_file(
    demo_models: dict[str, DemoModel], variants: Path
) -> None:
    v1, v2 = demo_models["digits-v1"], demo_models["digits-v2"]
    spec, files = _build(_files(demo_models, variants), _profile())
    stables = {CAM: _stable(v1)}
    data = v2.dataset.parent
    blind = class_offers(spec, files, _profile(), stables, datasets_dir=data)[CAM]
    assert blind.variant is None
    assert f"the class runs {stables[CAM].release_id}: give its model file" in blind.gate
    seeing = class_offers(
        spec, files, _profile(), stables, datasets_dir=data, baselines=[v1.path.read_bytes()]
    )[CAM]
    assert seeing.variant == "fp16"
    assert "vs the stable's" in seeing.gate


def test_a_class_no_variant_passes_is_a_refusal(
    demo_models: dict[str, DemoModel], variants: Path
) -> None:
    v2 = demo_models["digits-v2"]
    strict = _profile(min_accuracy=1.0)
    spec, files = _build(_files(demo_models, variants), strict)
    offer = class_offers(spec, files, strict, {}, datasets_dir=v2.dataset.parent)[CAM]
    assert offer.variant is None
    assert offer.refusal is not None
    assert offer.refusal.startswith(f"{CAM}: no variant passes the accuracy gate (fp16: ")
