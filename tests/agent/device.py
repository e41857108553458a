"""A device laid out on disk as an installed one would be: an enrollment bundle, a data
folder whose state and model store make the agent serve a model at its start, and a
file of real inputs to replay. Shared by the CLI's process tests and bench/agent_start."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.store import AgentStore, PersistedState
from broker.config import BrokerPorts
from broker.launcher import free_ports
from edgefleet.home import Home
from models import DemoModel, load_dataset
from tests.agent.conftest import release_of

__all__ = ["DEVICE", "HW_CLASS", "InstalledDevice", "installed_device"]

DEVICE = "cam-001"
HW_CLASS = "jetson-vision-standard"


@dataclass(frozen=True)
class InstalledDevice:
    bundle: Path
    data: Path
    replay: Path
    """The model's held-out inputs, one member named after its input."""


def installed_device(root: Path, model: DemoModel) -> InstalledDevice:
    """A device in ``root`` that serves ``model`` from its store at the start, pointing
    at ports where no broker runs (it serves offline)."""
    devices, services, websockets = free_ports(3)
    ports = BrokerPorts(devices=devices, services=services, websockets=websockets)
    home = Home.init(root / "home", ports=ports)
    bundle = home.enroll(DEVICE, HW_CLASS)
    data = root / "data"
    models = data / "artifacts" / "models"
    models.mkdir(parents=True)
    shutil.copyfile(model.path, models / f"{model.sha256}.onnx")
    AgentStore(data / "state.json").save(PersistedState(active=release_of(model)))
    replay = root / "inputs.npz"
    x = load_dataset(model.dataset, "holdout").x
    inputs: dict[str, Any] = {model.input_name: x.astype(np.float32)}
    np.savez(replay, **inputs)
    return InstalledDevice(bundle=bundle, data=data, replay=replay)
