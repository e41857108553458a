"""Shared fixtures for the coordinator tests: the shipped class profiles, the real demo
models, and a rollout record admitted the way the coordinator admits one.

The demo models go to the same folder under the session's base temp dir as the agent
tests use, so a full run trains them only once.
"""

from __future__ import annotations

import pytest

from coordinator.profiles import ClassProfile, load_profiles
from coordinator.rollout import RolloutRecord
from models import INPUT_NAME, DemoModel, build_demo_models
from models.export import LABEL_OUTPUT, PROBABILITIES_OUTPUT
from schemas import ArtifactRef, Phase, Release, TensorSpec, Variant

CLASS = "jetson-vision-standard"
T0 = 1_700_000_000.0


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DemoModel]:
    return build_demo_models(tmp_path_factory.getbasetemp() / "demo-models")


@pytest.fixture(scope="session")
def profiles() -> dict[str, ClassProfile]:
    return load_profiles()


@pytest.fixture(scope="session")
def digits_variants(demo_models: dict[str, DemoModel]) -> dict[str, Variant]:
    """Each digits demo model as an operator declares it: the models' documented I/O."""
    return {
        name: Variant(
            label="fp32",
            artifact=ArtifactRef(sha256=model.sha256, size=model.size),
            inputs=(TensorSpec(name=INPUT_NAME, dtype="float32", shape=("N", 64)),),
            outputs=(
                TensorSpec(name=PROBABILITIES_OUTPUT, dtype="float32", shape=("N", 10)),
                TensorSpec(name=LABEL_OUTPUT, dtype="int64", shape=("N",)),
            ),
        )
        for name, model in demo_models.items()
        if name.startswith("digits-")
    }


@pytest.fixture
def record(profiles: dict[str, ClassProfile], digits_variants: dict[str, Variant]) -> RolloutRecord:
    """digits-v2 admitted for jetson-vision-standard, in its first wave of 10/50/100 %."""
    profile = profiles[CLASS]
    candidate = digits_variants["digits-v2"]
    release = Release(
        name="digits-v2",
        variant=candidate.label,
        artifact=candidate.artifact,
        runtime=profile.runtime,
        inputs=candidate.inputs,
        outputs=candidate.outputs,
        health=profile.health,
    )
    return RolloutRecord(
        id="rollout-7",
        generation=1,
        spec=b"signed spec bytes",
        classes=(CLASS,),
        candidates={CLASS: release},
        waves_percent=(10.0, 50.0, 100.0),
        canaries=("cam-canary",),
        success_ratio=1.0,
        max_failure_ratio=0.0,
        wave_timeout_s=600.0,
        phase=Phase.WAVE,
        wave=0,
        wave_started_at=T0,
        updated_at=T0,
    )
