"""Shared fixtures for the models tests: the real demo models, their data set files, and
real fp16/int8 builds of the two models worth building per precision.

The demo models are built once per session into the same folder the agent and
coordinator tests use, so whichever runs first builds and the others reuse the files.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from models import DataSet, DemoModel, VariantBuild, build_demo_models, build_variants
from models.datafile import load_dataset
from models.precision import Precision

Runner = Callable[[Mapping[str, npt.NDArray[np.generic]]], Mapping[str, npt.NDArray[np.generic]]]
ALL_PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16", "int8", "int8-dynamic")


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DemoModel]:
    return build_demo_models(tmp_path_factory.getbasetemp() / "demo-models")


@pytest.fixture(scope="session")
def digits_calibration(demo_models: dict[str, DemoModel]) -> DataSet:
    return load_dataset(demo_models["digits-v3"].dataset, "calibration")


@pytest.fixture(scope="session")
def digits_holdout(demo_models: dict[str, DemoModel]) -> DataSet:
    return load_dataset(demo_models["digits-v3"].dataset, "holdout")


@pytest.fixture(scope="session")
def cytology_calibration(demo_models: dict[str, DemoModel]) -> DataSet:
    return load_dataset(demo_models["cytology-v1"].dataset, "calibration")


@pytest.fixture(scope="session")
def cytology_holdout(demo_models: dict[str, DemoModel]) -> DataSet:
    return load_dataset(demo_models["cytology-v1"].dataset, "holdout")


@pytest.fixture(scope="session")
def v3_builds(
    demo_models: dict[str, DemoModel], digits_calibration: DataSet
) -> dict[str, VariantBuild]:
    """digits-v3 in every precision, keyed by label."""
    made = build_variants(
        demo_models["digits-v3"].path.read_bytes(), digits_calibration, precisions=ALL_PRECISIONS
    )
    return {b.label: b for b in made}


@pytest.fixture(scope="session")
def cytology_builds(
    demo_models: dict[str, DemoModel], cytology_calibration: DataSet
) -> dict[str, VariantBuild]:
    """cytology-v1 in every precision, keyed by label."""
    made = build_variants(
        demo_models["cytology-v1"].path.read_bytes(),
        cytology_calibration,
        precisions=ALL_PRECISIONS,
    )
    return {b.label: b for b in made}


@pytest.fixture(scope="session")
def v3_miscalibrated(demo_models: dict[str, DemoModel], digits_calibration: DataSet) -> bytes:
    """digits-v3 quantised to int8 with calibration rows 100x brighter than any real digit:
    activation scales 100x too coarse, so most hidden activations round to a few levels."""
    wrong = DataSet(x=digits_calibration.x * 100.0, y=None, source="calibration x100")
    (build,) = build_variants(
        demo_models["digits-v3"].path.read_bytes(), wrong, precisions=["int8"]
    )
    return build.data


def ort_runner(
    model: bytes,
    *,
    threads: int = 1,
    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
) -> Runner:
    """Feed -> outputs by name with a fresh CPU onnxruntime session, as an agent runs."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = level
    session = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(feed: Mapping[str, npt.NDArray[np.generic]]) -> Mapping[str, npt.NDArray[np.generic]]:
        return dict(zip(names, session.run(None, dict(feed)), strict=True))

    return run
