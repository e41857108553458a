"""Fixtures of the command line's own tests: the demo models, built once per session."""

from __future__ import annotations

import pytest

from models import DemoModel
from tests.modelcache import shared_demo_models


@pytest.fixture(scope="session")
def demo_models(request: pytest.FixtureRequest) -> dict[str, DemoModel]:
    """The demo models, built once for every test process (``tests.modelcache``)."""
    return shared_demo_models(request.config)
