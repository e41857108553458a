"""Shared fixtures for the coordinator tests: the shipped class profiles, the real demo
models (for the validation and gate tests), and a rollout record admitted the way the
coordinator admits one (built without models, ``tests.coordinator.records``).
"""

from __future__ import annotations

import pytest

from coordinator.profiles import ClassProfile, load_profiles
from coordinator.rollout import RolloutRecord
from models import INPUT_NAME, DemoModel
from models.export import LABEL_OUTPUT, PROBABILITIES_OUTPUT
from schemas import ArtifactRef, TensorSpec, Variant
from tests.coordinator.records import CLASS, T0, make_record, make_release
from tests.modelcache import shared_demo_models

__all__ = ["CLASS", "T0"]


@pytest.fixture(scope="session")
def demo_models(request: pytest.FixtureRequest) -> dict[str, DemoModel]:
    """The demo models, built once for every test process (``tests.modelcache``)."""
    return shared_demo_models(request.config)


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
def record(profiles: dict[str, ClassProfile]) -> RolloutRecord:
    """A candidate admitted for jetson-vision-standard, in its first wave of 10/50/100 %
    (no model is built: the rollout engines read digests and numbers only)."""
    profile = profiles[CLASS]
    release = make_release(runtime=profile.runtime, health=profile.health)
    return make_record(candidates={CLASS: release})
