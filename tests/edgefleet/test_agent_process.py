"""``edgefleet agent run`` as a device runs it: a process of its own, under a notify
socket as systemd gives one, serving the model in its store from replayed inputs. It
loads neither the model toolchain nor the coordinator, logs JSON lines on request, and
stops cleanly on SIGTERM. Also: the systemd unit in the repository verifies."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from models import DemoModel
from schemas import TelemetrySummary, decode
from tests.agent.device import installed_device

REPO: Final = Path(__file__).parents[2]
HEAVY: Final = ("sklearn", "scipy", "onnx", "coordinator", "models", "rich")
"""Top-level packages a device process must not import."""


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(120)  # a bound on a hung process, not a speed assertion
    try:
        yield sock, path
    finally:
        sock.close()


def _imported(stderr: str) -> set[str]:
    """Top-level packages named by ``PYTHONPROFILEIMPORTTIME`` lines."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            names.add(name.split(".")[0])
    return names


def test_agent_run_serves_without_the_toolchain_and_stops_cleanly_under_systemd(
    tmp_path: Path, demo_models: dict[str, DemoModel], notify: tuple[socket.socket, str]
) -> None:
    sock, address = notify
    device = installed_device(tmp_path, demo_models["digits-v1"])
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PYTHONPROFILEIMPORTTIME": "1",
        "NOTIFY_SOCKET": address,
        "WATCHDOG_USEC": "1000000",
        "EDGEFLEET_LOG_FORMAT": "json",
        "EDGEFLEET_DATA": str(device.data),
    }
    command = [sys.executable, "-m", "edgefleet.cli", "-v", "agent", "run"]
    command += ["--bundle", str(device.bundle), "--replay", str(device.replay)]
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert sock.recv(256).startswith(b"READY=1")
        assert sock.recv(256) == b"WATCHDOG=1"
        assert sock.recv(256) == b"WATCHDOG=1", "pinged again: the loop lives"
        proc.send_signal(signal.SIGTERM)
        while (said := sock.recv(256)) == b"WATCHDOG=1":
            pass
        assert said == b"STOPPING=1"
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-2000:]

    imported = _imported(stderr)
    assert {"agent", "onnxruntime", "paho"} <= imported
    assert not imported & set(HEAVY), f"a device process imported {imported & set(HEAVY)}"
    logs = [json.loads(line) for line in stderr.splitlines() if not line.startswith("import ")]
    assert any(line["msg"] == "cam-001: stopping" for line in logs), logs
    assert all({"ts", "level", "logger", "msg"} <= line.keys() for line in logs)
    # It served: the window committed at the stop counts the inferences of the replay.
    db = sqlite3.connect(f"file:{device.data / 'outbox.sqlite'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT payload FROM outbox WHERE kind = 'telemetry'").fetchall()
    finally:
        db.close()
    summaries = [decode(bytes(row[0]), TelemetrySummary) for row in rows]
    assert sum(s.count for s in summaries) > 0
    assert sum(s.errors for s in summaries) == 0


def test_importing_the_agent_loads_no_toolchain() -> None:
    code = (
        "import sys, agent, agent.config, agent.sdnotify, edgefleet.cli, edgefleet.agentcli\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "onnxruntime" in out
    assert not set(out) & set(HEAVY)


def test_a_bad_setting_ends_the_command_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('bundle = "/nowhere"\ninference_hz = -1\n')
    result = subprocess.run(
        [sys.executable, "-m", "edgefleet.cli", "agent", "run", "--config", str(config)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"edgefleet: {config}: inference_hz:")
    assert result.stderr.count("\n") == 1


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (REPO / "deploy" / "edgefleet-agent.service").read_text()
    assert "/opt/edgefleet/bin/edgefleet " in unit
    # verify checks that ExecStart exists: point it at this environment's command.
    edgefleet = Path(sys.executable).with_name("edgefleet")
    local = tmp_path / "edgefleet-agent.service"
    local.write_text(unit.replace("/opt/edgefleet/bin/edgefleet ", f"{edgefleet} "))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(local)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", "no warning either (unknown keys are only warned about)"
    for needed in ("Type=notify", "WatchdogSec=", "Restart=always", "NoNewPrivileges=yes"):
        assert needed in unit
