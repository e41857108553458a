"""The device install, as a new user makes it: ``pip install edgefleet`` without extras
in a fresh virtual environment. It runs the agent's commands and imports the agent; the
operator's commands say which extra they need. Slow (it installs onnxruntime and the
rest): run it with ``.venv/bin/pytest -m slow tests/edgefleet/test_lean_install.py``."""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import signal
import subprocess
import time
import venv
from pathlib import Path
from typing import Final

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient

from broker.launcher import free_ports
from edgefleet.home import Home
from models import DemoModel, load_dataset
from models.export import LABEL_OUTPUT
from tests.agent.device import installed_device

REPO: Final = Path(__file__).parents[2]

pytestmark = pytest.mark.slow


def _run(*command: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in command], cwd=cwd, capture_output=True, text=True, check=False
    )


def test_the_base_install_runs_the_agent_and_nothing_more(
    tmp_path: Path, demo_models: dict[str, DemoModel]
) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # Build from a copy: pip writes its build files beside the sources.
    source = tmp_path / "edgefleet"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".*", "__pycache__", "build"))
    installed = _run(python, "-m", "pip", "install", "-q", str(source), cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr[-3000:]
    listed = _run(python, "-m", "pip", "list", "--format=freeze", cwd=tmp_path).stdout.lower()
    for absent in ("scikit-learn", "scipy", "onnx==", "rich"):
        assert absent not in listed, f"{absent} in the device install"

    help_ = _run(env_dir / "bin" / "edgefleet", "agent", "run", "--help", cwd=tmp_path)
    assert help_.returncode == 0, help_.stderr
    assert "--config" in help_.stdout
    imported = _run(
        python, "-c", "import agent, agent.config, agent.sdnotify; print(agent.Agent)", cwd=tmp_path
    )
    assert imported.returncode == 0, imported.stderr
    assert "agent.service.Agent" in imported.stdout

    operator = _run(env_dir / "bin" / "edgefleet", "keys", "init", cwd=tmp_path)
    assert operator.returncode == 2
    assert "edgefleet[coordinator]" in operator.stderr
    home = Home.init(tmp_path / "home")
    bundle = home.enroll("cam-001", "jetson-vision-standard")
    simulated = _run(
        env_dir / "bin" / "edgefleet", "agent", "run", "--bundle", bundle, cwd=tmp_path
    )
    assert simulated.returncode == 2
    assert "install edgefleet[models]" in simulated.stderr

    # The device's model, served to applications from the base install alone: the
    # endpoint answers a plain HTTP client and a KServe v2 client library.
    model = demo_models["digits-v1"]
    device = installed_device(tmp_path / "device", model)
    (port,) = free_ports(1)
    command = [env_dir / "bin" / "edgefleet", "agent", "run", "--bundle", device.bundle]
    command += ["--data", device.data, "--serve", str(port)]
    proc = subprocess.Popen(
        [str(c) for c in command], cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )
    try:
        _served_over_http(port, model)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-2000:]


def _served_over_http(port: int, model: DemoModel) -> None:
    x = load_dataset(model.dataset, "holdout").x[:4].astype(np.float32)
    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    (expected,) = session.run([LABEL_OUTPUT], {model.input_name: x})
    deadline = time.monotonic() + 60  # a bound on a hung start, not a speed assertion
    while True:
        try:
            with contextlib.closing(http.client.HTTPConnection("127.0.0.1", port, timeout=10)) as c:
                c.request("GET", "/v2/health/ready")
                if c.getresponse().status == 200:
                    break
        except OSError:
            pass  # not listening yet: asked again below
        assert time.monotonic() < deadline, "the endpoint never got ready"
        time.sleep(0.2)
    body = {
        "inputs": [
            {
                "name": model.input_name,
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }
    with contextlib.closing(http.client.HTTPConnection("127.0.0.1", port, timeout=10)) as conn:
        conn.request("POST", "/v2/models/jetson-vision-standard/infer", json.dumps(body))
        answer = json.loads(conn.getresponse().read())
    labels = next(o for o in answer["outputs"] if o["name"] == LABEL_OUTPUT)["data"]
    assert labels == expected.tolist()
    assert answer["model_version"].startswith(f"{model.name}")
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
    try:
        assert client.is_server_ready()
        tensor = httpclient.InferInput(model.input_name, list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("jetson-vision-standard", [tensor])
        assert result.as_numpy(LABEL_OUTPUT).tolist() == expected.tolist()
    finally:
        client.close()
