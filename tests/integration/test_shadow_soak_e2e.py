"""Shadow soak refuses a disagreeing build before it ever answers an application.

The disagreeing build is a real model: logistic regression trained by the project's
toolchain on the shipped digits with every label shifted by one (a digit 3 is called 4),
exported like the demo models. It is as fast and well-formed as digits-v1 and passes any
self-test on its own; only its answers disagree. Rolled out with a shadow soak to devices
serving digits-v1, it runs beside v1 on their camera input without answering; every
device reports it unhealthy with its agreement, the rollout rolls back, and every answer
applications got meanwhile, through ``Agent.infer`` and through the KServe v2 endpoint,
names digits-v1.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import itertools
import json
from pathlib import Path

import numpy as np

from agent import Agent
from agent.lifecycle import Stage
from agent.serve import ServeConfig
from edgefleet.compose import SpecOptions, publish_rollout
from edgefleet.fleet import Fleet
from models import INPUT_NAME, DemoModel, DigitsSplit, load_digits_split
from models.export import export_classifier, serialize
from models.train import train_logreg
from schemas import HealthReport, Phase, ShadowBudget, Verdict, WaveSpec
from tests.integration.fleetkit import (
    JETSON,
    MakeFleet,
    Wire,
    live,
    profiles,
    release_id,
    roll_out,
    run,
    start_agent_with,
)

FLOOR = 0.9
SHIFTED = "digits-shifted"


def shifted_build(out: Path) -> Path:
    """digits logistic regression trained on labels shifted by one, as an ONNX file."""
    split = load_digits_split()
    shift = (np.arange(10) + 1) % 10
    wrong = DigitsSplit(
        split.x_train, shift[split.y_train], split.x_holdout, shift[split.y_holdout], split.seed
    )
    trained = train_logreg(wrong)
    path = out / f"{SHIFTED}.onnx"
    path.write_bytes(serialize(export_classifier(trained.layers, graph_name=SHIFTED)))
    return path


def kserve_release(port: int, x: np.ndarray) -> str:
    """Ask the device's endpoint as any KServe v2 client would; the release answering."""
    body = {"inputs": [{"name": INPUT_NAME, "shape": list(x.shape), "datatype": "FP32",
                        "data": x.reshape(-1).tolist()}]}  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(
            "POST",
            f"/v2/models/{JETSON}/infer",
            json.dumps(body),
            {"content-type": "application/json"},
        )
        response = conn.getresponse()
        answer = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 200, answer
    return str(answer["model_version"])


async def application(agent: Agent, x: np.ndarray, answered: list[str]) -> None:
    """An application on the device, asking the model all along: the embedding API
    and the local endpoint by turns."""
    await agent.until_serving()
    assert agent.server is not None
    await agent.server.serving.wait()
    port = agent.server.port
    assert port is not None
    for turn in itertools.count():
        sample = x[turn % len(x)][None, :]
        if turn % 2:
            answered.append(await asyncio.to_thread(kserve_release, port, sample))
        else:
            answered.append((await agent.infer({INPUT_NAME: sample})).release_id)
        await asyncio.sleep(0.02)


def test_a_build_that_disagrees_is_refused_in_shadow_and_never_answers(
    demo_models: dict[str, DemoModel], make_fleet: MakeFleet
) -> None:
    fleet = make_fleet({JETSON: 3})
    path = shifted_build(fleet.workdir)
    shifted = f"{SHIFTED}:fp32@{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"
    x = np.ascontiguousarray(load_digits_split().x_holdout[:50], dtype=np.float32)
    reports = run(_refused_in_shadow(fleet, demo_models, path, x))
    assert reports
    assert {r.release for r in reports} == {shifted}
    for report in reports:
        assert report.agreement is not None
        assert report.agreement < FLOOR
        assert report.shadow_inferences >= 20
        assert any(r.startswith("agreement:") for r in report.reasons), report.reasons


async def _refused_in_shadow(
    fleet: Fleet, demo_models: dict[str, DemoModel], path: Path, x: np.ndarray
) -> list[HealthReport]:
    v1 = release_id(demo_models["digits-v1"])
    devices = sorted(fleet.home.devices())
    answered: dict[str, list[str]] = {d: [] for d in devices}
    async with (
        live(fleet, agents=()) as tg,
        Wire.open(fleet.home) as wire,
        fleet.operator() as operator,
    ):
        agents = {d: start_agent_with(fleet, tg, d, serve=ServeConfig(port=0)) for d in devices}
        await roll_out(operator, fleet, wire, demo_models["digits-v1"], rollout_id="install-v1")
        apps = [tg.create_task(application(agents[d], x, answered[d])) for d in devices]
        await publish_rollout(
            operator,
            fleet.home,
            path,
            rollout_id="shadow-shifted",
            classes=(JETSON,),
            profiles=profiles(fleet),
            options=SpecOptions(
                waves=(WaveSpec(percent=100.0),), shadow=ShadowBudget(min_agreement=FLOOR)
            ),
            name=SHIFTED,
        )
        final = await wire.until(
            lambda: wire.final_status("shadow-shifted"), what="the shadow rollout to end"
        )
        assert final.phase is Phase.ROLLED_BACK, final.reason
        assert final.counts.agreement is not None, "the status shows the agreement"
        assert final.counts.agreement < FLOOR
        reports = await wire.until(
            lambda: [
                r
                for r in wire.health.values()
                if r.rollout_id == "shadow-shifted" and r.verdict is Verdict.UNHEALTHY
            ],
            what="unhealthy reports of the shifted build",
        )
        await wire.until(
            lambda: all(
                a.stage in (Stage.SERVING, Stage.DEGRADED)
                and a.active_release is not None
                and a.active_release.release_id == v1
                for a in agents.values()
            ),
            what="every device on digits-v1",
        )
        for app in apps:
            app.cancel()
    for device_id, got in answered.items():
        assert got, f"{device_id}: no application answers"
        assert set(got) == {v1}, f"{device_id}: answered by {set(got) - {v1}}"
    return reports
