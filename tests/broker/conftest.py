"""Fixtures: a real Mosquitto per test (it starts in ~0.1 s), from the repo's config."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from broker.acl import DeviceGrant
from broker.launcher import which_mosquitto
from tests.broker.localfleet import FleetPKI, LocalFleet, broker_tempdir

DEVICES = (
    DeviceGrant("cam-001", "jetson-vision-standard"),
    DeviceGrant("cam-002", "jetson-vision-standard"),
    DeviceGrant("gw-001", "factory-gateway-gpu"),
)


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """No thread outlives a test: sessions have none of their own, and what opens their
    connections in the event loop's pool is bounded by ``connect_timeout``."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 3
    leaked: set[threading.Thread] = set()
    while time.monotonic() < deadline:
        leaked = {t for t in set(threading.enumerate()) - before if t.is_alive()}
        if not leaked:
            return
        time.sleep(0.05)
    pytest.fail(f"threads leaked: {sorted(t.name for t in leaked)}")


@pytest.fixture(scope="session")
def pki() -> FleetPKI:
    return FleetPKI.generate()


@pytest.fixture
def fleet(pki: FleetPKI) -> Iterator[LocalFleet]:
    which_mosquitto()  # fail with the install hint rather than a confusing error
    with broker_tempdir() as tmp, LocalFleet(tmp, devices=DEVICES, pki=pki) as running:
        yield running
