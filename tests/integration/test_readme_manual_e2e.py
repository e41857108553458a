"""The README's manual path, exactly as written: every command of its "Using it" block
run as a subprocess of the installed ``edgefleet`` command, from an empty folder, the
services (broker, coordinator, agent) in the background as in their own terminals.

The commands are read from README.md, so the test fails when the README drifts from
what works. The only thing the test adds is free ports for the broker, written into the
fresh home right after ``keys init``, since the default ports may be taken.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from broker.config import BrokerPorts
from broker.launcher import free_ports, which_mosquitto
from edgefleet.home import Home

REPO: Final = Path(__file__).resolve().parents[2]
EDGEFLEET: Final = Path(sys.executable).with_name("edgefleet")
SERVICES: Final = {("broker", "up"), ("coordinator", "run"), ("agent", "run")}
"""Commands that run until stopped: each starts in the background, as in a terminal."""
COMMAND_TIMEOUT_S: Final = 300.0
"""A guard against a hang, not a measure: the slowest command builds the models."""


@dataclass(frozen=True)
class Step:
    line: str
    """The README line, as written."""
    args: tuple[str, ...]
    """What follows ``edgefleet``, its comment removed."""

    @property
    def is_service(self) -> bool:
        return self.args[:2] in SERVICES


def readme_steps(readme: Path) -> list[Step]:
    """The commands of the "Using it" section's indented block, in order. A line that
    offers alternatives (``pause|resume|abort ID``) is a usage pattern, not a command."""
    text = readme.read_text(encoding="utf-8")
    match = re.search(r"^## Using it\n(.*?)(?=^## )", text, re.MULTILINE | re.DOTALL)
    assert match is not None, "README.md has no 'Using it' section"
    steps = []
    for line in match.group(1).splitlines():
        if not line.startswith("    ") or not line.strip():
            continue
        words = shlex.split(line, comments=True)
        assert words[0] == "edgefleet", f"not an edgefleet command: {line!r}"
        if any("|" in word for word in words):
            continue
        steps.append(Step(line=line.strip(), args=tuple(words[1:])))
    return steps


def test_the_readme_block_is_read_as_commands() -> None:
    steps = readme_steps(REPO / "README.md")
    assert steps[0].args == ("keys", "init")
    assert sum(step.is_service for step in steps) == 3
    assert any(step.args[:2] == ("rollout", "start") for step in steps)


class Shell:
    """An empty working folder and the processes started in it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.env = {k: v for k, v in os.environ.items() if k != "EDGEFLEET_HOME"}
        self.services: list[tuple[Step, subprocess.Popen[bytes]]] = []

    def run(self, step: Step) -> str:
        """Run a command to its end; its standard output."""
        done = subprocess.run(
            [str(EDGEFLEET), *step.args],
            cwd=self.folder,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
        assert done.returncode == 0, (
            f"{step.line!r} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
        )
        self.check_services()
        return done.stdout

    def start(self, step: Step) -> None:
        log = self.folder / f"service-{len(self.services)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [str(EDGEFLEET), *step.args],
                cwd=self.folder,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.services.append((step, process))
        if step.args[:2] == ("broker", "up"):
            self.wait_for(log, "mosquitto up", step)

    def wait_for(self, log: Path, text: str, step: Step) -> None:
        deadline = time.monotonic() + 30.0
        while text not in log.read_text(errors="replace"):
            self.check_services()
            assert time.monotonic() < deadline, f"{step.line!r} did not print {text!r}"
            time.sleep(0.05)

    def check_services(self) -> None:
        for step, process in self.services:
            if process.poll() is not None:
                logs = "\n".join(
                    p.read_text(errors="replace") for p in self.folder.glob("service-*.log")
                )
                pytest.fail(f"{step.line!r} exited {process.returncode}\n{logs}")

    def stop(self) -> None:
        """Stop every service, the last started first, as Ctrl-C in each terminal."""
        for _, process in reversed(self.services):
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(15.0)
                except subprocess.TimeoutExpired:
                    # Its own session: its children (the broker's Mosquitto) go with it.
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


@contextlib.contextmanager
def shell() -> Iterator[Shell]:
    # World-traversable: Mosquitto drops to its own user when started as root.
    folder = Path(tempfile.mkdtemp(prefix="edgefleet-readme-"))
    folder.chmod(0o755)
    running = Shell(folder)
    try:
        yield running
    finally:
        running.stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_the_readme_manual_path_works_as_written() -> None:
    which_mosquitto()
    assert EDGEFLEET.is_file(), f"no {EDGEFLEET}: install the package into the venv"
    steps = readme_steps(REPO / "README.md")
    started: list[str] = []
    with shell() as sh:
        for step in steps:
            if step.is_service:
                sh.start(step)
                continue
            out = sh.run(step)
            if step.args[:2] == ("keys", "init"):
                home = Home(sh.folder / ".edgefleet")
                devices, services, websockets = free_ports(3)
                host, _ = home.broker()
                home.set_broker(
                    host, BrokerPorts(devices=devices, services=services, websockets=websockets)
                )
            if step.args[:2] == ("rollout", "start"):
                started.append(out.strip().splitlines()[-1])
            if step.args[:2] == ("rollout", "status") and "--watch" in step.args:
                assert " completed " in out.strip().splitlines()[-1], out
        assert started, "the README starts no rollout"
        for rollout_id in started:
            status = sh.run(
                Step(line=f"status {rollout_id}", args=("rollout", "status", rollout_id))
            )
            assert f"{rollout_id} gen 1 completed " in status, status
