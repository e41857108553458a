"""Candidate validation against class profiles, on the real demo models: a model that does
not fit a class is refused for it before any device sees it."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.profiles import ClassProfile, load_profiles
from coordinator.validate import ModelFacts, problems_for_class
from models import DemoModel
from schemas import TensorSpec, Variant

TIGHT_CLASS = """
[classes.tiny-mcu]
providers = ["CPUExecutionProvider"]
precisions = {precisions}
max_model_bytes = {max_bytes}
health = {{ max_error_rate = 0.01, p95_latency_ms = 10.0, min_inferences = 60, soak_seconds = 4.0 }}
"""


def _profile(tmp_path: Path, *, max_bytes: str, precisions: str) -> ClassProfile:
    path = tmp_path / "classes.toml"
    path.write_text(TIGHT_CLASS.format(max_bytes=max_bytes, precisions=precisions))
    return load_profiles(path)["tiny-mcu"]


@pytest.fixture(scope="module")
def facts(demo_models: dict[str, DemoModel]) -> dict[str, ModelFacts]:
    return {name: ModelFacts(m.path.read_bytes()) for name, m in demo_models.items()}


def test_model_facts_describe_the_real_file(
    facts: dict[str, ModelFacts],
    demo_models: dict[str, DemoModel],
    digits_variants: dict[str, Variant],
) -> None:
    for name, variant in digits_variants.items():
        model = demo_models[name]
        assert facts[name].size == model.size
        assert facts[name].precision == "fp32"
        assert facts[name].inputs == variant.inputs
        assert [o.name for o in facts[name].outputs] == list(model.output_names)


def test_digits_v2_fits_every_shipped_class_that_runs_fp32(
    facts: dict[str, ModelFacts],
    digits_variants: dict[str, Variant],
    profiles: dict[str, ClassProfile],
) -> None:
    assert "fp32" in profiles["medical-cart-cpu"].precisions
    for profile in profiles.values():
        assert problems_for_class(facts["digits-v2"], digits_variants["digits-v2"], profile) == []


def test_slow_build_is_refused_by_a_class_with_a_one_megabyte_limit(
    tmp_path: Path,
    facts: dict[str, ModelFacts],
    digits_variants: dict[str, Variant],
) -> None:
    small = _profile(tmp_path, max_bytes="1_000_000", precisions='["fp32"]')
    slow = facts["digits-v2-slow"]
    assert slow.size > 1_000_000
    problems = problems_for_class(slow, digits_variants["digits-v2-slow"], small)
    assert problems == [f"{slow.size} bytes exceed tiny-mcu's limit of 1000000"]
    # The same limit lets the real v2 through: the size, not the class, refused it.
    assert problems_for_class(facts["digits-v2"], digits_variants["digits-v2"], small) == []


def test_fp32_model_is_refused_by_an_int8_only_class(
    tmp_path: Path,
    facts: dict[str, ModelFacts],
    digits_variants: dict[str, Variant],
) -> None:
    int8_only = _profile(tmp_path, max_bytes="200_000_000", precisions='["int8"]')
    problems = problems_for_class(facts["digits-v2"], digits_variants["digits-v2"], int8_only)
    assert problems == ["fp32 is not among tiny-mcu's ('int8',)"]


def test_candidate_declaring_inputs_the_model_lacks_is_refused(
    facts: dict[str, ModelFacts],
    digits_variants: dict[str, Variant],
    profiles: dict[str, ClassProfile],
) -> None:
    honest = digits_variants["digits-v2"]
    lies = [
        (TensorSpec(name="image", dtype="float32", shape=("N", 64)),),
        (TensorSpec(name="pixels", dtype="uint8", shape=("N", 64)),),
        (*honest.inputs, TensorSpec(name="mask", dtype="float32", shape=("N", 64))),
    ]
    for inputs in lies:
        liar = honest.model_copy(update={"inputs": inputs})
        problems = problems_for_class(facts["digits-v2"], liar, profiles["medical-cart-cpu"])
        assert len(problems) == 1
        assert problems[0].startswith("declared inputs")


def test_candidate_declaring_outputs_the_model_lacks_is_refused(
    facts: dict[str, ModelFacts],
    digits_variants: dict[str, Variant],
    profiles: dict[str, ClassProfile],
) -> None:
    honest = digits_variants["digits-v2"]
    liar = honest.model_copy(
        update={"outputs": (TensorSpec(name="label", dtype="float32", shape=("N",)),)}
    )
    problems = problems_for_class(facts["digits-v2"], liar, profiles["medical-cart-cpu"])
    assert len(problems) == 1
    assert problems[0].startswith("declared outputs")
    # Declaring fewer outputs than the model has is fine: devices read only those.
    subset = honest.model_copy(update={"outputs": honest.outputs[1:]})
    assert problems_for_class(facts["digits-v2"], subset, profiles["medical-cart-cpu"]) == []


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_bytes_that_are_not_a_loadable_model_raise_value_error(
    demo_models: dict[str, DemoModel], damage: str
) -> None:
    data = demo_models["digits-v1"].path.read_bytes()
    broken = {"garbage": b"\x8f not onnx at all" * 64, "truncated": data[:-100], "empty": b""}
    with pytest.raises(ValueError, match="model does not load"):
        ModelFacts(broken[damage])
