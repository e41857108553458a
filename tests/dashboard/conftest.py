"""Fixtures of the dashboard server's tests: a real Mosquitto (the repo's config, with
its secure WebSockets listener) and the server's settings for it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from broker.launcher import which_mosquitto
from dashboard import BrokerTarget, DashboardConfig
from tests.broker.localfleet import FleetPKI, LocalFleet, broker_tempdir


@pytest.fixture(scope="session")
def pki() -> FleetPKI:
    return FleetPKI.generate()


@pytest.fixture
def fleet(pki: FleetPKI) -> Iterator[LocalFleet]:
    which_mosquitto()
    with broker_tempdir() as tmp, LocalFleet(tmp, pki=pki) as running:
        yield running


@pytest.fixture
def config(fleet: LocalFleet) -> DashboardConfig:
    """The dashboard of ``fleet``, on any free loopback port, with no audit log."""
    broker = fleet.broker
    return DashboardConfig(
        broker=BrokerTarget(host=broker.host, port=broker.ports.websockets, ca_file=broker.ca_file),
        username="dashboard",
        password=fleet.passwords["dashboard"],
        port=0,
    )
