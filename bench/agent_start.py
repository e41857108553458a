"""What ``edgefleet agent run`` weighs on a device: its memory with digits-v1 loaded and
its cold start to the first inference, against a bare onnxruntime process on the same
model, measured in one run on this machine.

A device is laid out as an installed one (``tests.agent.device``): an enrollment bundle
whose broker is not running (the agent serves offline), digits-v1 in its model store and
state, and the model's held-out inputs in a replay file. Each round starts, one after
the other:

* ``bare``: a Python process that imports onnxruntime and numpy, loads the model and
  runs one input: the floor;
* ``agent``: ``edgefleet agent run --replay FILE`` from this tree, the device's lean
  path;
* ``agent-sim``: ``edgefleet agent run --source digits``, the simulated camera, which
  reads its images through the model toolchain (scikit-learn);
* ``before`` (with ``--before TREE``): ``edgefleet agent run --source digits`` from
  another checkout, e.g. one from before the lean install.

Start is the time from spawning the process to its first inference done (the bare
process says so itself; the agents through a probe that ``sitecustomize`` hooks on
``agent.inference.Inference._count``, the same for every tree). RSS is read from
``/proc`` a second after that. Figures are medians of ``--rounds`` rounds.

Human-readable lines come first; the last line is one JSON object with every figure and
the ratios to the bare process.

Run from the repository root: ``.venv/bin/python -m bench.agent_start [--rounds N]
[--before /path/to/older/checkout]``
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

from models import build_demo_models
from tests.agent.device import InstalledDevice, installed_device

REPO: Final = Path(__file__).parents[1]
SETTLE_S: Final = 1.0
"""How long after the first inference the RSS is read (a serving process, not a
starting one)."""
TIMEOUT_S: Final = 180.0

_PROBE: Final = '''\
import os, sys
_ADDRESS = os.environ.get("EDGEFLEET_BENCH_PROBE")


def _say():
    import socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"inferred", _ADDRESS)


class _Probe:
    """Wraps Inference._count once agent.inference is imported: the first call says so."""

    def find_spec(self, name, path, target=None):
        if name != "agent.inference":
            return None
        sys.meta_path.remove(self)
        from importlib.machinery import PathFinder
        spec = PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            cls = module.Inference
            count = cls._count

            def first(self, *args, **kwargs):
                cls._count = count
                result = count(self, *args, **kwargs)
                _say()
                return result

            cls._count = first

        spec.loader.exec_module = exec_module
        return spec


if _ADDRESS:
    sys.meta_path.insert(0, _Probe())
'''

_BARE: Final = """\
import os, socket, sys
import numpy as np
import onnxruntime as ort
model, replay = sys.argv[1], sys.argv[2]
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
with np.load(replay) as inputs:
    feed = {name: inputs[name][:1] for name in inputs.files}
session.run(None, feed)
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
    sock.sendto(b"inferred", os.environ["EDGEFLEET_BENCH_PROBE"])
sys.stdin.read()
"""


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    msg = f"no VmRSS for {pid}"
    raise RuntimeError(msg)


class _Probe:
    def __init__(self, folder: Path) -> None:
        (folder / "sitecustomize.py").write_text(_PROBE)
        self.folder = folder
        self.address = str(folder / "probe.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.address)
        self.sock.settimeout(TIMEOUT_S)

    def measure(self, command: list[str], *, tree: Path, cwd: Path) -> tuple[float, float]:
        """Seconds from spawn to the first inference, and MB of RSS a moment after."""
        env = {
            **os.environ,
            "PYTHONPATH": f"{self.folder}{os.pathsep}{tree}",
            "EDGEFLEET_BENCH_PROBE": self.address,
        }
        env.pop("NOTIFY_SOCKET", None)
        started = time.perf_counter()
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            try:
                self.sock.recv(64)
            except TimeoutError:
                proc.kill()
                _, err = proc.communicate()
                msg = f"no first inference from {command[:6]}: {err.decode()[-2000:]}"
                raise RuntimeError(msg) from None
            start_s = time.perf_counter() - started
            time.sleep(SETTLE_S)
            rss = _rss_mb(proc.pid)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                if proc.stdin is not None:
                    proc.stdin.close()
                try:
                    proc.wait(timeout=TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        return start_s, rss


def _agent(device: InstalledDevice, *source: str) -> list[str]:
    command = [sys.executable, "-m", "edgefleet.cli", "agent", "run"]
    return [*command, "--bundle", str(device.bundle), "--data", str(device.data), *source]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", type=Path, help="another checkout to measure as `before`")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-start-") as tmp:
        root = Path(tmp)
        model = build_demo_models(root / "models")["digits-v1"]
        device = installed_device(root / "device", model)
        probe = _Probe(root)
        runs: dict[str, list[str]] = {
            "bare": [sys.executable, "-c", _BARE, str(model.path), str(device.replay)],
            "agent": _agent(device, "--replay", str(device.replay)),
            "agent-sim": _agent(device, "--source", "digits"),
        }
        trees = {"bare": REPO, "agent": REPO, "agent-sim": REPO}
        if args.before is not None:
            runs["before"] = _agent(device, "--source", "digits")
            trees["before"] = args.before.resolve()
        figures: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
        for round_ in range(args.rounds):
            for name, command in runs.items():
                start_s, rss = probe.measure(command, tree=trees[name], cwd=trees[name])
                figures[name].append((start_s, rss))
                print(
                    f"round {round_ + 1} {name:>9}: {start_s:6.2f} s to the first inference, "
                    f"{rss:6.1f} MB RSS",
                    flush=True,
                )
        probe.sock.close()

    median_s = {name: statistics.median(s for s, _ in v) for name, v in figures.items()}
    median_mb = {name: statistics.median(r for _, r in v) for name, v in figures.items()}
    result: dict[str, object] = {"rounds": args.rounds, "model": "digits-v1"}
    for name in runs:
        result[f"{name}_start_s"] = round(median_s[name], 3)
        result[f"{name}_rss_mb"] = round(median_mb[name], 1)
        if name != "bare":
            result[f"{name}_start_ratio"] = round(median_s[name] / median_s["bare"], 2)
            result[f"{name}_rss_ratio"] = round(median_mb[name] / median_mb["bare"], 2)
    result["goal_rss_met"] = median_mb["agent"] <= 120
    result["goal_start_met"] = median_s["agent"] <= 2.0
    print(json.dumps(result))


if __name__ == "__main__":
    main()
