"""Class profiles: the shipped classes.toml, and a bad file refused at start-up."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from coordinator.profiles import DEFAULT_PROFILES, class_policy, load_profiles
from schemas import ArtifactRef, Candidate, RolloutSpec, TensorSpec, Variant

GOOD = """
[classes.edge-cpu]
providers = ["CPUExecutionProvider"]
max_model_bytes = 1_000_000
health = { max_error_rate = 0.01, p95_latency_ms = 10.0, min_inferences = 60, soak_seconds = 4.0 }
"""


def test_shipped_classes_toml_defines_the_four_hardware_classes() -> None:
    profiles = load_profiles()
    assert set(profiles) == {
        "jetson-vision-standard",
        "intel-lowpower-detector",
        "factory-gateway-gpu",
        "medical-cart-cpu",
    }
    for name, profile in profiles.items():
        assert profile.name == name
        assert profile.runtime.providers == profile.providers
        assert 0.0 < profile.rollout.success_ratio <= 1.0
    medical = profiles["medical-cart-cpu"]
    assert medical.rollout.wave_timeout_s == 7200.0
    assert medical.health.soak_seconds == 300.0
    assert profiles["factory-gateway-gpu"].runtime.intra_op_threads == 2
    assert load_profiles(DEFAULT_PROFILES) == profiles


def test_minimal_class_gets_bounded_defaults(tmp_path: Path) -> None:
    path = tmp_path / "classes.toml"
    path.write_text(GOOD)
    profile = load_profiles(path)["edge-cpu"]
    assert profile.precisions == ("fp32",)
    assert profile.rollout.success_ratio == 1.0
    assert profile.rollout.max_failure_ratio == 0.0
    assert profile.runtime.on_fallback == "serve"


def test_a_class_may_refuse_a_fallback_provider_for_its_releases(tmp_path: Path) -> None:
    path = tmp_path / "classes.toml"
    path.write_text(
        GOOD.replace(
            "max_model_bytes = 1_000_000", 'max_model_bytes = 1_000_000\non_fallback = "refuse"'
        )
    )
    profile = load_profiles(path)["edge-cpu"]
    assert profile.runtime.on_fallback == "refuse"
    path.write_text(
        GOOD.replace(
            "max_model_bytes = 1_000_000", 'max_model_bytes = 1_000_000\non_fallback = "maybe"'
        )
    )
    with pytest.raises(ValidationError, match="on_fallback"):
        load_profiles(path)


@pytest.mark.parametrize(
    "mistake",
    [
        ("max_model_bytes = 1_000_000", "max_model_bytes = 1_000_000\nmax_modle_bytes = 5"),
        ("soak_seconds = 4.0 }", "soak_seconds = 4.0, p99_latency_ms = 3.0 }"),
        ("max_model_bytes = 1_000_000", "max_model_bytes = 1_000_000\nrollout = { wave = [50] }"),
        ("max_model_bytes = 1_000_000", "max_model_bytes = 0"),
        ('providers = ["CPUExecutionProvider"]', "providers = []"),
        ("max_model_bytes = 1_000_000", 'max_model_bytes = 1_000_000\nprecisions = ["int4"]'),
        (
            "max_model_bytes = 1_000_000",
            'max_model_bytes = 1_000_000\nprecisions = ["fp32", "fp32"]',
        ),
        ("max_model_bytes = 1_000_000", "max_model_bytes = 1_000_000\nprecisions = []"),
        ("max_model_bytes = 1_000_000", 'max_model_bytes = 1_000_000\ngate = { dataset = "../x" }'),
    ],
)
def test_class_with_an_unknown_key_or_bad_value_is_refused(
    tmp_path: Path, mistake: tuple[str, str]
) -> None:
    path = tmp_path / "classes.toml"
    path.write_text(GOOD.replace(*mistake))
    with pytest.raises(ValidationError):
        load_profiles(path)


def test_file_that_is_not_toml_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "classes.toml"
    path.write_text(GOOD.replace("]\n", "\n", 1))
    with pytest.raises(tomllib.TOMLDecodeError):
        load_profiles(path)


def _spec(classes: tuple[str, ...], **fields: float) -> RolloutSpec:
    candidate = Candidate(
        name="m",
        variants=(
            Variant(
                label="fp32",
                artifact=ArtifactRef(sha256="0" * 64, size=1),
                inputs=(TensorSpec(name="x", dtype="float32", shape=(1,)),),
                outputs=(TensorSpec(name="y", dtype="float32", shape=(1,)),),
            ),
        ),
    )
    return RolloutSpec(
        id="r",
        generation=1,
        classes=classes,
        candidate=candidate,
        waves_percent=(100.0,),
        issued_at=0.0,
        operator="op",
        **fields,
    )


def test_each_class_is_judged_by_its_own_defaults_where_the_spec_is_silent() -> None:
    profiles = load_profiles()
    spec = _spec(("factory-gateway-gpu", "medical-cart-cpu"))
    gpu = class_policy(spec, profiles["factory-gateway-gpu"], None)
    assert (gpu.success_ratio, gpu.max_failure_ratio, gpu.timeout_s) == (0.95, 0.05, 1800.0)
    cart = class_policy(spec, profiles["medical-cart-cpu"], None)
    assert (cart.success_ratio, cart.max_failure_ratio, cart.timeout_s) == (1.0, 0.0, 7200.0)
    # What the spec sets wins.
    own = class_policy(
        _spec(
            ("medical-cart-cpu",),
            success_ratio=0.5,
            max_failure_ratio=0.25,
            wave_timeout_s=30.0,
            min_soak_s=5.0,
            silence_s=40.0,
        ),
        profiles["medical-cart-cpu"],
        None,
    )
    assert (own.success_ratio, own.max_failure_ratio, own.timeout_s) == (0.5, 0.25, 30.0)
    assert (own.min_soak_s, own.silence_s) == (5.0, 40.0)


def test_without_a_silence_limit_a_device_has_three_soaks_and_a_minute() -> None:
    profiles = load_profiles()
    jetson = profiles["jetson-vision-standard"]
    policy = class_policy(_spec((jetson.name,)), jetson, jetson.health)
    assert policy.silence_s == 3 * jetson.health.soak_seconds + 60.0
