"""Fixtures of the integration tests: the demo models (built once per session) and
whole fleets (home, keys, enrolled devices, a real Mosquitto) in world-traversable
work folders, since Mosquitto drops to its own user when started as root."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.launcher import which_mosquitto
from edgefleet.runner import Fleet
from models import DemoModel, build_demo_models
from tests.integration.fleetkit import AGENT_CONFIG, TEST_PROFILES, MakeFleet, add_test_accounts


@pytest.fixture(scope="session")
def demo_models(request: pytest.FixtureRequest) -> dict[str, DemoModel]:
    """digits-v1, digits-v2 and digits-v2-slow, reused from pytest's cache when intact."""
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        folder = Path(cache.mkdir("edgefleet-demo-models"))
    else:
        folder = Path(tempfile.mkdtemp(prefix="edgefleet-models-"))
    return build_demo_models(folder)


@pytest.fixture
def make_fleet() -> Iterator[MakeFleet]:
    """``make_fleet({class: devices})``: a set-up fleet with its broker running, on the
    test profiles, with the tests' own accounts (``fleetkit.ADMIN_ACCOUNTS`` and
    ``WIRE_ACCOUNTS``); brokers stopped and folders removed afterwards."""
    which_mosquitto()
    made: list[Fleet] = []

    def make(classes: dict[str, int]) -> Fleet:
        workdir = Path(tempfile.mkdtemp(prefix="edgefleet-it-"))
        workdir.chmod(0o755)
        profiles = workdir / "profiles.toml"
        profiles.write_text(TEST_PROFILES, encoding="utf-8")
        fleet = Fleet(
            workdir=workdir, classes=classes, agent_config=AGENT_CONFIG, profiles=profiles
        )
        made.append(fleet)
        fleet.setup()
        add_test_accounts(fleet)
        return fleet

    yield make
    for fleet in made:
        try:
            if hasattr(fleet, "broker"):
                fleet.close()
        finally:
            shutil.rmtree(fleet.workdir, ignore_errors=True)
