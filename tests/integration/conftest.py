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
from models import DemoModel
from tests.integration.fleetkit import AGENT_CONFIG, TEST_PROFILES, MakeFleet, add_test_accounts
from tests.modelcache import shared_demo_models


@pytest.fixture(scope="session")
def demo_models(request: pytest.FixtureRequest) -> dict[str, DemoModel]:
    """The demo models, built once for every test process (``tests.modelcache``)."""
    return shared_demo_models(request.config)


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
