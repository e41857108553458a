"""Inference through the agent's path against bare onnxruntime: same model, same input,
same number of rows, same run.

Issue 10 asks the agent's inference path to cost nearly nothing on top of onnxruntime.
For digits-v1 (a tiny model: the path's own cost dominates) and digits-v3, two processes
are started and kept running:

* bare: loads onnxruntime only and runs the model in a loop with the agent's session
  options (one intra-op thread), either one row per call (the issue's "bare ORT" floor)
  or ``--callers`` rows per call (what onnxruntime alone makes of the same rows batched);
* agent: a real :class:`agent.Agent` (no broker: its trust and signed manifest are handed
  to it, the model is in its store, its endpoint is on) called with
  ``await agent.infer(...)`` flat out, one row per call: by ``--callers`` callers at once
  (the path batches what waits) and by one caller (every call pays the path's whole cost).
  Every call is counted like any inference (telemetry window, soak).

Every call, in both processes, runs the same seeded sample; the bench checks that the
agent's answer is onnxruntime's and that the agent counted every call. Rates are rows per
second. The machine is shared and its speed drifts, so the two processes are measured in
alternating segments of ``--seconds``, ``--rounds`` times, and each figure is the median
over the rounds of the ratio of adjacent segments:

* ``{v}_ratio``: agent with ``--callers`` callers over bare one row per call (the issue's
  figure, "the inference loop flat out");
* ``{v}_serial_ratio``: agent with one caller over bare one row per call (like for like);
* ``{v}_batched_ratio``: agent with ``--callers`` callers over bare with ``--callers`` rows
  per call (the path against onnxruntime given the same batches);
* ``{v}_inline_share`` and ``{v}_rows_per_turn``: with ``--callers`` callers, how the
  agent's batches ran (inline on the event loop, or in its worker thread) and how many
  calls one batch served.

Human-readable lines first; the last line is one JSON object with every figure.
Not part of the test suite.

Run: ``.venv/bin/python -m bench.agent [--seconds S] [--rounds R] [--callers N]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

MODELS = ("digits-v1", "digits-v3")
INPUT_SHAPE = (1, 64)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _sample() -> np.ndarray:
    return np.random.default_rng(0).random(INPUT_SHAPE, dtype=np.float32)


def _say(figures: dict[str, Any]) -> None:
    print(json.dumps(figures), flush=True)


# -- the children: one JSON command a line in, one JSON answer a line out ---------------


def _bare(model: Path) -> None:
    import onnxruntime as ort  # noqa: PLC0415 (the bare process imports nothing else)

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]
    label = next(o.name for o in session.get_outputs() if "int" in o.type)
    _say({"ready": True})
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("end"):
            answer = session.run([label], {name: _sample()})[0]
            _say({"rss_mb": _rss_mb(), "label": int(answer.reshape(-1)[0])})
            return
        feed = {name: np.repeat(_sample(), command["rows"], axis=0)}
        calls = 0
        start = time.perf_counter()
        deadline = start + command["seconds"]
        while time.perf_counter() < deadline:
            session.run(outputs, feed)
            calls += 1
        elapsed = time.perf_counter() - start
        _say({"rows": calls * command["rows"], "elapsed": elapsed})


async def _flat_out(
    infer: Callable[[dict[str, np.ndarray]], Awaitable[object]],
    feed: dict[str, np.ndarray],
    callers: int,
    seconds: float,
) -> tuple[int, float]:
    count = 0
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal count
        while time.perf_counter() < deadline:
            await infer(feed)
            count += 1

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return count, time.perf_counter() - start


async def _agent(work: Path) -> None:
    from agent import Agent, AgentConfig, Bundle  # noqa: PLC0415 (only what a device loads)
    from agent.lifecycle import Stage  # noqa: PLC0415
    from agent.serve import ServeConfig  # noqa: PLC0415
    from broker.transport import Message  # noqa: PLC0415
    from schemas import topics  # noqa: PLC0415

    bundle_dir = work / "bundle"
    bundle = Bundle.load(bundle_dir)
    config = AgentConfig(data_dir=work / "data", serve=ServeConfig(port=0))
    agent = Agent(bundle, bundle_dir, config)
    async with agent:
        for topic, name in (
            (topics.trust(), "trust"),
            (topics.class_manifest(bundle.hw_class), "manifest"),
        ):
            payload = (work / name).read_bytes()
            await agent.receive(Message(topic=topic, payload=payload, retain=True, qos=1))
        await agent.until_serving()
        release = agent.active_release
        assert release is not None
        feed = {release.inputs[0].name: _sample()}
        while agent.stage is not Stage.SERVING:  # the soak judges it on these
            await agent.infer(feed)
        turns = agent._inference.turns  # where the calls ran, to tell the reader
        counted = agent.inferences_total
        _say({"ready": True})
        while line := await asyncio.to_thread(sys.stdin.readline):
            command = json.loads(line)
            if command.get("end"):
                counted = agent.inferences_total - counted
                answer = await agent.infer(feed)
                labels = [a for a in answer.outputs.values() if a.dtype.kind in "iu"]
                label = int(labels[0].reshape(-1)[0])
                errors = agent.inference_errors
                _say({"rss_mb": _rss_mb(), "label": label, "counted": counted, "errors": errors})
                return
            before = dict(turns)
            calls, elapsed = await _flat_out(
                agent.infer, feed, command["callers"], command["seconds"]
            )
            ran = {where: turns[where] - before[where] for where in turns}
            _say({"rows": calls, "elapsed": elapsed} | ran)


# -- the parent --------------------------------------------------------------------------


def _prepare(work: Path, models_dir: Path) -> None:
    """A home with one enrolled device and, per model, a folder the agent child runs in."""
    from broker.config import BrokerPorts  # noqa: PLC0415
    from broker.launcher import free_ports  # noqa: PLC0415
    from edgefleet.home import Home  # noqa: PLC0415
    from models import build_demo_models  # noqa: PLC0415
    from models.export import LABEL_OUTPUT, PROBABILITIES_OUTPUT  # noqa: PLC0415
    from schemas import (  # noqa: PLC0415
        MANIFEST_KIND,
        ArtifactRef,
        HealthBudget,
        Manifest,
        Release,
        Role,
        Runtime,
        TensorSpec,
        encode,
        seal,
    )

    demo = build_demo_models(models_dir)
    devices, services, websockets = free_ports(3)  # nothing listens: no broker here
    ports = BrokerPorts(devices=devices, services=services, websockets=websockets)
    home = Home.init(work / "home", ports=ports)
    bundle = home.enroll("bench-000", "bench-class")
    for name in MODELS:
        model = demo[name]
        release = Release(
            name=model.name,
            artifact=ArtifactRef(sha256=model.sha256, size=model.size),
            runtime=Runtime(providers=("CPUExecutionProvider",)),
            inputs=(TensorSpec(name=model.input_name, dtype="float32", shape=("N", 64)),),
            outputs=(
                TensorSpec(name=PROBABILITIES_OUTPUT, dtype="float32", shape=("N", 10)),
                TensorSpec(name=LABEL_OUTPUT, dtype="int64", shape=("N",)),
            ),
            health=HealthBudget(
                max_error_rate=0.01, p95_latency_ms=50.0, min_inferences=20, soak_seconds=0.0
            ),
        )
        now = time.time()
        manifest = Manifest(
            hw_class="bench-class", seq=1, issued_at=now, expires_at=now + 3600, stable=release
        )
        folder = work / name
        shutil.copytree(bundle, folder / "bundle")
        store = folder / "data" / "artifacts" / "models"
        store.mkdir(parents=True)
        shutil.copyfile(model.path, store / f"{model.sha256}.onnx")
        (folder / "trust").write_bytes(home.trust())
        (folder / "manifest").write_bytes(
            seal(MANIFEST_KIND, encode(manifest), [home.key(Role.MANIFEST)])
        )
        (folder / "model").write_text(str(model.path))


class _Child:
    """One child process, asked for segments one at a time."""

    def __init__(self, kind: str, work: Path) -> None:
        self._log = (work / f"{kind}.log").open("w")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "bench.agent", "--child", kind, "--work", str(work)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self._kind, self._work = kind, work
        self.rows = 0
        """Rows run in every segment so far."""
        self.segments: list[dict[str, Any]] = []
        self._answer()  # ready

    def _answer(self) -> dict[str, Any]:
        stdout = self._process.stdout
        assert stdout is not None
        line = stdout.readline()
        if not line:
            self._process.wait()
            sys.stderr.write((self._work / f"{self._kind}.log").read_text())
            msg = f"{self._kind} child failed ({self._process.returncode})"
            raise RuntimeError(msg)
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ask(self, **command: Any) -> dict[str, Any]:
        stdin: IO[str] | None = self._process.stdin
        assert stdin is not None
        stdin.write(json.dumps(command) + "\n")
        stdin.flush()
        return self._answer()

    def rate(self, **command: Any) -> float:
        answer = self.ask(**command)
        self.rows += answer["rows"]
        self.segments.append(answer)
        return float(answer["rows"] / answer["elapsed"])

    def end(self) -> dict[str, Any]:
        answer = self.ask(end=True)
        self._process.wait()
        self._log.close()
        return answer


def _measure(work: Path, seconds: float, rounds: int, callers: int) -> dict[str, Any]:
    """One model: the figures of the module's docstring (``bare_1``: bare one row a call,
    ``bare_n``: bare ``callers`` rows a call, ``many``/``one``: the agent's callers)."""
    bare, agent = _Child("bare", work), _Child("agent", work)
    rates: dict[str, list[float]] = {"bare_1": [], "bare_n": [], "many": [], "one": []}
    ratios: dict[str, list[float]] = {"ratio": [], "serial_ratio": [], "batched_ratio": []}
    for _ in range(rounds):
        bare_1 = bare.rate(rows=1, seconds=seconds)
        many = agent.rate(callers=callers, seconds=seconds)
        one = agent.rate(callers=1, seconds=seconds)
        bare_n = bare.rate(rows=callers, seconds=seconds)
        for key, value in (("bare_1", bare_1), ("bare_n", bare_n), ("many", many), ("one", one)):
            rates[key].append(value)
        ratios["ratio"].append(many / bare_1)
        ratios["serial_ratio"].append(one / bare_1)
        ratios["batched_ratio"].append(many / bare_n)
    bare_end, agent_end = bare.end(), agent.end()
    concurrent = agent.segments[0::2]  # the segments with ``callers`` callers
    inline = sum(s["inline"] for s in concurrent)
    turns = inline + sum(s["worker"] for s in concurrent)
    rows = sum(s["rows"] for s in concurrent)
    return {
        "bare_per_s": round(statistics.median(rates["bare_1"])),
        "bare_batched_per_s": round(statistics.median(rates["bare_n"])),
        "agent_per_s": round(statistics.median(rates["many"])),
        "agent_serial_per_s": round(statistics.median(rates["one"])),
        **{key: round(statistics.median(values), 3) for key, values in ratios.items()},
        "ratio_range": [round(min(ratios["ratio"]), 3), round(max(ratios["ratio"]), 3)],
        "agent_rss_mb": round(agent_end["rss_mb"], 1),
        "bare_rss_mb": round(bare_end["rss_mb"], 1),
        "calls": agent.rows,
        "counted": agent_end["counted"],
        "errors": agent_end["errors"],
        "same_answer": agent_end["label"] == bare_end["label"],
        "inline_share": round(inline / max(1, turns), 3),
        "rows_per_turn": round(rows / max(1, turns), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="one segment")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument(
        "--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "edgefleet-bench-models"
    )
    parser.add_argument("--child", choices=("bare", "agent"), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child == "bare":
        _bare(Path((args.work / "model").read_text()))
        return 0
    if args.child == "agent":
        asyncio.run(_agent(args.work))
        return 0

    figures: dict[str, Any] = {
        "seconds": args.seconds,
        "rounds": args.rounds,
        "callers": args.callers,
    }
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-agent-") as tmp:
        work = Path(tmp)
        _prepare(work, args.models_dir)
        for name in MODELS:
            got = _measure(work / name, args.seconds, args.rounds, args.callers)
            key = name.replace("digits-", "")
            figures |= {f"{key}_{figure}": value for figure, value in got.items()}
            print(
                f"{name}: bare ORT {got['bare_per_s']:,}/s one row a call, "
                f"{got['bare_batched_per_s']:,} rows/s {args.callers} a call "
                f"({got['bare_rss_mb']:.0f} MB); agent {got['agent_per_s']:,}/s with "
                f"{args.callers} callers (ratio {got['ratio']}, {got['batched_ratio']} of "
                f"batched ORT), {got['agent_serial_per_s']:,}/s one at a time (ratio "
                f"{got['serial_ratio']}) ({got['agent_rss_mb']:.0f} MB); "
                f"{got['inline_share']:.0%} of batches inline, {got['rows_per_turn']} calls a "
                f"batch; same answer: {got['same_answer']}; counted {got['counted']:,} of "
                f"{got['calls']:,} calls"
            )
    figures["agent_rss_mb"] = max(figures["v1_agent_rss_mb"], figures["v3_agent_rss_mb"])
    figures["python"] = sys.version.split()[0]
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
