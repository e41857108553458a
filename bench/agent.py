"""Inference through the agent's path against a bare onnxruntime loop, same model, same run.

Issue 10 asks the agent's inference path to cost nearly nothing on top of onnxruntime.
For digits-v1 (a tiny model: the path's own cost dominates) and digits-v3, this bench:

* baseline: a process that only loads onnxruntime and runs the model in a loop, one
  sample per call, with the agent's session options (one intra-op thread) -- the
  issue's "bare ORT" floor; its RSS too;
* the agent: a process that runs a real :class:`agent.Agent` (no broker: its trust and
  signed manifest are handed to it, the model is in its store) with its endpoint on, and
  calls ``await agent.infer(...)`` flat out, one sample per call: ``--callers`` at once
  (the worker batches what waits), and one at a time (every call pays the path's full
  cost); every call is counted like any inference (telemetry window, soak). Its RSS is
  read after the run.

The ratio is the agent's inferences per second over the bare loop's. Human-readable
lines first; the last line is one JSON object with every figure.
Not part of the test suite.

Run: ``.venv/bin/python -m bench.agent [--seconds S] [--callers N]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


# -- the children ------------------------------------------------------------------------


def _bare(model: Path, seconds: float) -> dict[str, Any]:
    import onnxruntime as ort  # noqa: PLC0415 (the bare process imports nothing else)

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]
    feed = {name: _sample()}
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        session.run(outputs, feed)
        count += 1
    return {"rate": count / (time.perf_counter() - start), "rss_mb": _rss_mb()}


async def _flat_out(infer: Any, feed: dict[str, np.ndarray], callers: int, seconds: float) -> float:
    count = 0
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal count
        while time.perf_counter() < deadline:
            await infer(feed)
            count += 1

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return count / (time.perf_counter() - start)


async def _agent(work: Path, seconds: float, callers: int) -> dict[str, Any]:
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
        (name,) = (t.name for t in agent.active_release.inputs)  # type: ignore[union-attr]
        feed = {name: _sample()}
        while agent.stage is not Stage.SERVING:  # the soak judges it on these
            await agent.infer(feed)
        served = agent.inferences_total
        many = await _flat_out(agent.infer, feed, callers, seconds)
        one = await _flat_out(agent.infer, feed, 1, seconds)
        return {
            "rate": many,
            "serial_rate": one,
            "rss_mb": _rss_mb(),
            "counted": agent.inferences_total - served,
            "errors": agent.inference_errors,
        }


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


def _child(args: list[str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.agent", *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        msg = f"child {args[:2]} failed ({done.returncode})"
        raise RuntimeError(msg)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument(
        "--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "edgefleet-bench-models"
    )
    parser.add_argument("--child", choices=("bare", "agent"), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child == "bare":
        print(json.dumps(_bare(Path((args.work / "model").read_text()), args.seconds)))
        return 0
    if args.child == "agent":
        print(json.dumps(asyncio.run(_agent(args.work, args.seconds, args.callers))))
        return 0

    figures: dict[str, Any] = {"seconds": args.seconds, "callers": args.callers}
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-agent-") as tmp:
        work = Path(tmp)
        _prepare(work, args.models_dir)
        for name in MODELS:
            common = ["--work", str(work / name), "--seconds", str(args.seconds)]
            bare = _child(["--child", "bare", *common])
            agent = _child(["--child", "agent", *common, "--callers", str(args.callers)])
            key = name.replace("digits-", "")
            figures |= {
                f"{key}_bare_per_s": round(bare["rate"]),
                f"{key}_agent_per_s": round(agent["rate"]),
                f"{key}_agent_serial_per_s": round(agent["serial_rate"]),
                f"{key}_ratio": round(agent["rate"] / bare["rate"], 3),
                f"{key}_serial_ratio": round(agent["serial_rate"] / bare["rate"], 3),
                f"{key}_agent_rss_mb": round(agent["rss_mb"], 1),
                f"{key}_bare_rss_mb": round(bare["rss_mb"], 1),
                f"{key}_counted": agent["counted"],
                f"{key}_errors": agent["errors"],
            }
            print(
                f"{name}: bare ORT {bare['rate']:,.0f}/s ({bare['rss_mb']:.0f} MB); agent "
                f"{agent['rate']:,.0f}/s with {args.callers} callers, "
                f"{agent['serial_rate']:,.0f}/s one at a time ({agent['rss_mb']:.0f} MB)"
            )
    figures["agent_rss_mb"] = max(figures["v1_agent_rss_mb"], figures["v3_agent_rss_mb"])
    figures["python"] = sys.version.split()[0]
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
