"""The fuzz suite runs on the integration tests' fleets: the same demo models, the
same ``make_fleet`` (a real Mosquitto from the repo's config, real keys and bundles)."""

from __future__ import annotations

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

from tests.integration.conftest import demo_models, make_fleet

__all__ = ["demo_models", "hypothesis_home", "make_fleet"]


@pytest.fixture(scope="session", autouse=True)
def hypothesis_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Hypothesis keeps caches beside the working directory by default: here they go to
    a temporary folder, so a run leaves no ``.hypothesis`` folder in the repository."""
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
