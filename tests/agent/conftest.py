"""Shared fixtures for the agent tests: the real demo models and releases naming them.

The models are built once (training takes seconds) into pytest's cache and shared by every
test process (``tests.modelcache``).
"""

from __future__ import annotations

import pytest

from agent.runtime import ModelSlot
from models import INPUT_NAME, DemoModel, DigitsSplit, load_digits_split
from models.export import LABEL_OUTPUT, PROBABILITIES_OUTPUT
from schemas import ArtifactRef, HealthBudget, Release, Runtime, TensorSpec
from tests.modelcache import shared_demo_models

# The jetson-vision-standard latency budget: v1/v2 run far below it, the slow build far above.
BUDGET = HealthBudget(max_error_rate=0.01, p95_latency_ms=10.0, min_inferences=20, soak_seconds=0.0)


@pytest.fixture(scope="session")
def demo_models(request: pytest.FixtureRequest) -> dict[str, DemoModel]:
    return shared_demo_models(request.config)


@pytest.fixture(scope="session")
def digits_split() -> DigitsSplit:
    return load_digits_split()


def release_of(model: DemoModel) -> Release:
    """The release a manifest would carry for ``model``, declaring the models' I/O contract."""
    return Release(
        name=model.name,
        artifact=ArtifactRef(sha256=model.sha256, size=model.size),
        runtime=Runtime(providers=("CPUExecutionProvider",)),
        inputs=(TensorSpec(name=INPUT_NAME, dtype="float32", shape=("N", 64)),),
        outputs=(
            TensorSpec(name=PROBABILITIES_OUTPUT, dtype="float32", shape=("N", 10)),
            TensorSpec(name=LABEL_OUTPUT, dtype="int64", shape=("N",)),
        ),
        health=BUDGET,
    )


@pytest.fixture(scope="session")
def v1_release(demo_models: dict[str, DemoModel]) -> Release:
    return release_of(demo_models["digits-v1"])


@pytest.fixture(scope="session")
def v2_slot(demo_models: dict[str, DemoModel]) -> ModelSlot:
    model = demo_models["digits-v2"]
    return ModelSlot(release_of(model), model.path)


@pytest.fixture(scope="session")
def slow_slot(demo_models: dict[str, DemoModel]) -> ModelSlot:
    """digits-v2-slow loaded once: onnxruntime takes over a second to optimise it."""
    model = demo_models["digits-v2-slow"]
    return ModelSlot(release_of(model), model.path)
