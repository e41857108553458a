"""The inventory a device publishes in its state, read from the real machine and from
a thermal tree laid out as sysfs lays it."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest
from pydantic import ValidationError

from agent.inventory import DeviceInventory, hottest_zone
from schemas import DeviceState, Inventory, Mode, decode, encode
from tests.coordinator.records import device_state


def _zone(root: Path, n: int, temp: str) -> None:
    zone = root / f"thermal_zone{n}"
    zone.mkdir(parents=True)
    (zone / "temp").write_text(temp)


def test_the_hottest_readable_zone_is_reported(tmp_path: Path) -> None:
    _zone(tmp_path, 0, "41500\n")
    _zone(tmp_path, 1, "67250\n")
    _zone(tmp_path, 2, "garbage")
    _zone(tmp_path, 3, "999999999")  # a broken sensor, not a temperature
    assert hottest_zone(tmp_path) == 67.25
    assert hottest_zone(tmp_path / "none") is None


def test_the_inventory_is_the_machine_it_runs_on(tmp_path: Path) -> None:
    _zone(tmp_path / "thermal", 0, "50000")
    inventory = DeviceInventory(tmp_path / "data" / "not-yet", thermal=tmp_path / "thermal")
    now = inventory.current()
    assert now.arch == platform.machine()
    assert now.cores == os.cpu_count()
    assert now.ram_bytes > 0
    assert now.providers == tuple(ort.get_available_providers())
    assert "CPUExecutionProvider" in now.providers
    assert now.onnxruntime == ort.__version__
    assert now.agent
    assert now.temperature_c == 50.0
    assert now.disk_free_bytes is not None
    assert now.disk_free_bytes > 0, "the nearest existing parent's free space"


def _state(**more: Any) -> DeviceState:
    return device_state("cam-001", mode=Mode.IDLE, applied_seq=0, updated_at=0.0, **more)


def test_a_state_carries_the_inventory_and_older_states_still_decode(tmp_path: Path) -> None:
    inventory = DeviceInventory(tmp_path).current()
    state = _state(inventory=inventory)
    assert decode(encode(state), DeviceState).inventory == inventory
    old = _state()
    assert decode(encode(old), DeviceState).inventory is None


_FIELDS: dict[str, object] = {
    "arch": "x86_64",
    "os": "Linux",
    "cores": 2,
    "ram_bytes": 1,
    "onnxruntime": "1",
    "agent": "1",
}


@pytest.mark.parametrize(
    "change",
    [
        {"arch": "x" * 65},
        {"os": "x" * 65},
        {"onnxruntime": "x" * 65},
        {"agent": "x" * 65},
        {"providers": ["p"] * 17},
        {"providers": ["p" * 65]},
        {"cores": -1},
    ],
)
def test_an_inventory_out_of_bounds_is_refused_on_the_wire(change: dict[str, object]) -> None:
    Inventory.model_validate(_FIELDS)
    with pytest.raises(ValidationError):
        Inventory.model_validate({**_FIELDS, **change})
