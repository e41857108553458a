"""The device install, as a new user makes it: ``pip install edgefleet`` without extras
in a fresh virtual environment. It runs the agent's commands and imports the agent; the
operator's commands say which extra they need. Slow (it installs onnxruntime and the
rest): run it with ``.venv/bin/pytest -m slow tests/edgefleet/test_lean_install.py``."""

from __future__ import annotations

import shutil
import subprocess
import venv
from pathlib import Path
from typing import Final

import pytest

from edgefleet.home import Home

REPO: Final = Path(__file__).parents[2]

pytestmark = pytest.mark.slow


def _run(*command: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in command], cwd=cwd, capture_output=True, text=True, check=False
    )


def test_the_base_install_runs_the_agent_and_nothing_more(tmp_path: Path) -> None:
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
