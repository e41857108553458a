"""Applications use the model the fleet rolled out: the Open Inference Protocol endpoint
(KServe v2 REST) over TCP and a Unix socket, with a plain HTTP client and with a v2
client library, and the embedding API. A real agent (no broker: trust and manifests are
handed to it), real models; answers are checked against onnxruntime run directly."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from agent import Agent, Bundle
from agent.inference import InferenceFailedError, NotReadyError, Prediction
from agent.lifecycle import Stage
from agent.runtime import InvalidInputError
from agent.serve import ServeConfig
from edgefleet.home import Home
from models import INPUT_NAME, DemoModel, DigitsSplit
from models.export import LABEL_OUTPUT, PROBABILITIES_OUTPUT
from schemas import Release, Verdict, topics
from tests.agent.conftest import release_of
from tests.agent.test_agent_service import (
    DEVICE,
    GUARD_S,
    HW_CLASS,
    config,
    deliver,
    deliver_manifest,
    signed,
    stock,
    verdict_on,
    with_budget,
)
from tests.agent.test_agent_service import home as home  # noqa: PLC0414 (the fixture)


def make(home: Home, data_dir: Path, serve: ServeConfig | None) -> Agent:
    """An agent with no input source of its own: every inference is an application's."""
    bundle_dir = home.root / "devices" / DEVICE
    return Agent(Bundle.load(bundle_dir), bundle_dir, config(data_dir, serve=serve))


@asynccontextmanager
async def device(home: Home, data_dir: Path, serve: ServeConfig | None) -> AsyncIterator[Agent]:
    """A running agent, its endpoint (if any) listening."""
    agent = make(home, data_dir, serve)
    async with asyncio.timeout(GUARD_S), agent:
        if agent.server is not None:
            await agent.server.serving.wait()
        yield agent


async def install(agent: Agent, home: Home, release: Release) -> None:
    """Make ``release`` the device's stable model: with no source, the soak that judges
    it runs on inferences asked here (of zeros: any input counts)."""
    await deliver(agent, topics.trust(), home.trust())
    await deliver_manifest(agent, signed(home, 1, release))
    zeros = {INPUT_NAME: np.zeros((1, 64), dtype=np.float32)}
    async with asyncio.timeout(GUARD_S):
        await agent.until_serving()
        while agent.stage is not Stage.SERVING:
            await agent.infer(zeros)
    report = agent.last_health
    assert report is not None
    assert report.verdict is Verdict.HEALTHY


def direct(model: DemoModel, x: np.ndarray) -> dict[str, np.ndarray]:
    """The model's answer from onnxruntime itself, for comparison."""
    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    probabilities, labels = session.run([PROBABILITIES_OUTPUT, LABEL_OUTPUT], {INPUT_NAME: x})
    return {PROBABILITIES_OUTPUT: probabilities, LABEL_OUTPUT: labels}


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=GUARD_S)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(GUARD_S)
        sock.connect(str(self._path))
        self.sock = sock


class Client:
    """A plain HTTP/1.1 client (the standard library's), one kept-alive connection."""

    def __init__(self, conn: http.client.HTTPConnection) -> None:
        self._conn = conn

    @classmethod
    def tcp(cls, agent: Agent) -> Client:
        assert agent.server is not None
        assert agent.server.port is not None
        return cls(http.client.HTTPConnection("127.0.0.1", agent.server.port, timeout=GUARD_S))

    def _call(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        self._conn.request(method, path, body=body, headers=headers)
        response = self._conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()

    async def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        return await asyncio.to_thread(self._call, method, path, body, headers or {})

    async def json(self, method: str, path: str, document: object | None = None) -> tuple[int, Any]:
        body = None if document is None else json.dumps(document).encode()
        status, _, raw = await self.call(method, path, body, {"content-type": "application/json"})
        return status, json.loads(raw)

    def close(self) -> None:
        self._conn.close()


async def closed(writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()


def infer_request(x: np.ndarray) -> dict[str, Any]:
    return {
        "id": "req-1",
        "inputs": [
            {"name": INPUT_NAME, "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}
        ],
    }


def samples(split: DigitsSplit, rows: int) -> np.ndarray:
    return np.ascontiguousarray(split.x_holdout[:rows], dtype=np.float32)


# -- the endpoint with a plain HTTP client ---------------------------------------------------


def test_endpoint_answers_not_ready_before_a_model_then_serves_the_release_over_tcp(
    home: Home,
    tmp_path: Path,
    demo_models: dict[str, DemoModel],
    digits_split: DigitsSplit,
) -> None:
    model = demo_models["digits-v1"]
    stock(tmp_path, model)
    v1 = release_of(model)
    x = samples(digits_split, 5)
    expected = direct(model, x)

    async def scenario() -> None:
        async with device(home, tmp_path, ServeConfig(port=0)) as agent:
            client = Client.tcp(agent)
            try:
                assert (await client.json("GET", "/v2/health/live"))[0] == 200
                assert await client.json("GET", "/v2/health/ready") == (503, {"ready": False})
                status, body = await client.json(
                    "POST", f"/v2/models/{HW_CLASS}/infer", infer_request(x)
                )
                assert status == 503
                assert "no model" in body["error"]
                assert agent.inferences_total == 0

                await install(agent, home, v1)
                before = agent.inferences_total
                assert await client.json("GET", "/v2/health/ready") == (200, {"ready": True})
                status, server = await client.json("GET", "/v2")
                assert status == 200
                assert "binary_tensor_data" in server["extensions"]
                status, meta = await client.json("GET", f"/v2/models/{HW_CLASS}")
                assert status == 200
                assert meta["versions"] == [v1.release_id]
                assert meta["inputs"] == [
                    {"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, 64]}
                ]
                assert [o["name"] for o in meta["outputs"]] == [PROBABILITIES_OUTPUT, LABEL_OUTPUT]
                ready = await client.json("GET", f"/v2/models/{v1.name}/ready")
                assert ready[0] == 200

                status, answer = await client.json(
                    "POST", f"/v2/models/{HW_CLASS}/infer", infer_request(x)
                )
                assert status == 200
                assert answer["id"] == "req-1"
                assert answer["model_version"] == v1.release_id
                assert answer["parameters"]["release"] == v1.release_id
                outputs = {o["name"]: o for o in answer["outputs"]}
                assert outputs[LABEL_OUTPUT]["datatype"] == "INT64"
                assert outputs[LABEL_OUTPUT]["shape"] == [5]
                assert outputs[LABEL_OUTPUT]["data"] == expected[LABEL_OUTPUT].tolist()
                probabilities = np.asarray(outputs[PROBABILITIES_OUTPUT]["data"]).reshape(5, 10)
                np.testing.assert_allclose(probabilities, expected[PROBABILITIES_OUTPUT], rtol=1e-6)
                # Only the one request ran: counted like every inference of the device.
                assert agent.inferences_total == before + 1
                assert agent.inference_errors == 0
            finally:
                client.close()

    asyncio.run(scenario())


def test_binary_tensors_in_and_out_and_a_unix_socket(
    home: Home,
    tmp_path: Path,
    demo_models: dict[str, DemoModel],
    digits_split: DigitsSplit,
) -> None:
    model = demo_models["digits-v1"]
    stock(tmp_path, model)
    x = samples(digits_split, 3)
    expected = direct(model, x)
    path = tmp_path / "infer.sock"
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": INPUT_NAME,
                    "shape": [3, 64],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": LABEL_OUTPUT, "parameters": {"binary_data": True}}],
        }
    ).encode()

    async def scenario() -> None:
        async with device(home, tmp_path, ServeConfig(unix_path=path)) as agent:
            await install(agent, home, release_of(model))
            client = Client(UnixHTTPConnection(path))
            try:
                status, headers, body = await client.call(
                    "POST",
                    f"/v2/models/{model.name}/infer",
                    header + x.tobytes(),
                    {"Inference-Header-Content-Length": str(len(header))},
                )
            finally:
                client.close()
        assert status == 200
        length = int(headers["inference-header-content-length"])
        answer = json.loads(body[:length])
        (output,) = answer["outputs"]
        assert output["name"] == LABEL_OUTPUT
        assert output["parameters"]["binary_data_size"] == 3 * 8
        labels = np.frombuffer(body[length:], dtype="<i8")
        assert labels.tolist() == expected[LABEL_OUTPUT].tolist()

    asyncio.run(scenario())


def test_hostile_requests_get_bounded_4xx_errors_and_end_nothing(
    home: Home,
    tmp_path: Path,
    demo_models: dict[str, DemoModel],
    digits_split: DigitsSplit,
) -> None:
    model = demo_models["digits-v1"]
    stock(tmp_path, model)
    serve = ServeConfig(port=0, max_request_bytes=64 * 1024, idle_timeout_s=0.5, max_connections=4)
    x = samples(digits_split, 1)
    good = infer_request(x)
    long_name = "n" * 5000
    wrong: list[tuple[str, str, object, int]] = [
        ("GET", "/nope", None, 404),
        ("GET", f"/v2/models/{HW_CLASS}/infer", None, 405),
        ("GET", "/v2/models/other-model", None, 404),
        ("GET", f"/v2/models/{HW_CLASS}/versions/0123/ready", None, 404),
        ("POST", f"/v2/models/{HW_CLASS}/infer", {"inputs": []}, 400),
        ("POST", f"/v2/models/{HW_CLASS}/infer", {"inputs": "x"}, 400),
        (
            "POST",
            f"/v2/models/{HW_CLASS}/infer",
            {**good, "inputs": [{**good["inputs"][0], "datatype": "FP64"}]},
            400,
        ),
        (
            "POST",
            f"/v2/models/{HW_CLASS}/infer",
            {**good, "inputs": [{**good["inputs"][0], "shape": [1, 63]}]},
            400,
        ),
        (
            "POST",
            f"/v2/models/{HW_CLASS}/infer",
            {**good, "inputs": [{**good["inputs"][0], "data": [["a"] * 64]}]},
            400,
        ),
        (
            "POST",
            f"/v2/models/{HW_CLASS}/infer",
            {**good, "inputs": [{**good["inputs"][0], "name": long_name}]},
            400,
        ),
        ("POST", f"/v2/models/{HW_CLASS}/infer", {**good, "outputs": [{"name": long_name}]}, 400),
        (
            "POST",
            f"/v2/models/{HW_CLASS}/infer",
            {
                "inputs": [
                    {"name": INPUT_NAME, "shape": [2, 64], "datatype": "FP32", "data": x.tolist()}
                ]
            },
            400,
        ),
    ]

    async def scenario() -> None:
        async with device(home, tmp_path, serve) as agent:
            await install(agent, home, release_of(model))
            before = agent.inferences_total
            assert agent.server is not None
            port = agent.server.port
            assert port is not None
            client = Client.tcp(agent)
            try:
                for method, path, document, status in wrong:
                    body = None if document is None else json.dumps(document).encode()
                    got, _, raw = await client.call(method, path, body)
                    assert got == status, (path, document, raw[:300])
                    error = json.loads(raw)["error"]
                    assert 0 < len(error) <= 300
                got, _, raw = await client.call(
                    "POST", f"/v2/models/{HW_CLASS}/infer", b"{not json"
                )
                assert got == 400
            finally:
                client.close()
            too_big = Client.tcp(agent)
            try:
                got, _, _ = await too_big.call(
                    "POST", f"/v2/models/{HW_CLASS}/infer", b" " * (65 * 1024)
                )
                assert got == 413
            finally:
                too_big.close()

            # Broken HTTP, a stalled client and more connections than allowed.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"\x00\xff garbage\r\n\r\n")
            assert (await reader.read(200)).startswith(b"HTTP/1.1 400")
            await closed(writer)
            stalled = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
            for _, w in stalled:
                w.write(
                    b"POST /v2/models/x/infer HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n"
                )
            extra_reader, extra_writer = await asyncio.open_connection("127.0.0.1", port)
            assert (await extra_reader.read(200)).startswith(b"HTTP/1.1 503")
            await closed(extra_writer)
            for r, w in stalled:  # each closed by the server once idle too long
                assert await r.read() == b""
                await closed(w)

            # None of it ran the model, and the device serves on.
            assert agent.inferences_total == before
            client = Client.tcp(agent)
            try:
                status, answer = await client.json("POST", f"/v2/models/{HW_CLASS}/infer", good)
            finally:
                client.close()
            assert status == 200
            assert answer["model_version"] == release_of(model).release_id
            assert agent.inferences_total == before + 1

    asyncio.run(scenario())


def test_a_kserve_v2_client_library_works_unchanged(
    home: Home,
    tmp_path: Path,
    demo_models: dict[str, DemoModel],
    digits_split: DigitsSplit,
) -> None:
    """tritonclient speaks v2 REST (binary tensors by default)."""
    httpclient = pytest.importorskip(
        "tritonclient.http", reason="tritonclient[http] is not installed here"
    )
    model = demo_models["digits-v3"]
    stock(tmp_path, model)
    x = samples(digits_split, 4)
    expected = direct(model, x)
    v3 = release_of(model)

    def use(port: int) -> tuple[bool, dict[str, Any], np.ndarray, dict[str, Any]]:
        client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
        try:
            ready = client.is_server_ready() and client.is_model_ready(HW_CLASS)
            meta = client.get_model_metadata(HW_CLASS)
            tensor = httpclient.InferInput(INPUT_NAME, list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            result = client.infer(HW_CLASS, [tensor])
            return ready, meta, result.as_numpy(LABEL_OUTPUT), result.get_response()
        finally:
            client.close()

    async def scenario() -> None:
        async with device(home, tmp_path, ServeConfig(port=0)) as agent:
            await install(agent, home, v3)
            assert agent.server is not None
            assert agent.server.port is not None
            ready, meta, labels, response = await asyncio.to_thread(use, agent.server.port)
        assert ready
        assert meta["versions"] == [v3.release_id]
        assert labels.tolist() == expected[LABEL_OUTPUT].tolist()
        assert response["model_version"] == v3.release_id

    asyncio.run(scenario())


# -- the embedding API -----------------------------------------------------------------------


def test_embedded_agent_batches_concurrent_callers_and_counts_each(
    home: Home,
    tmp_path: Path,
    demo_models: dict[str, DemoModel],
    digits_split: DigitsSplit,
) -> None:
    """Many callers at once: each gets its own rows' answer (batched or not), each call
    is one counted inference, and a wrong input is refused before the model."""
    model = demo_models["digits-v3"]
    stock(tmp_path, model)
    x = samples(digits_split, 200)
    expected = direct(model, x)[LABEL_OUTPUT]

    async def scenario() -> None:
        async with device(home, tmp_path, None) as agent:
            with pytest.raises(NotReadyError):
                await agent.infer({INPUT_NAME: x[:1]})
            await install(agent, home, release_of(model))
            before = agent.inferences_total
            answers = await asyncio.gather(
                *(agent.infer({INPUT_NAME: x[i : i + 1]}) for i in range(len(x)))
            )
            labels = [int(p.outputs[LABEL_OUTPUT][0]) for p in answers]
            assert labels == expected.tolist()
            assert {p.release_id for p in answers} == {release_of(model).release_id}
            assert agent.inferences_total == before + len(x)
            # A poisoned input among many fails its own call only (its batch is split).
            poisoned = x[:1].copy()
            poisoned[0, 0] = np.nan
            feeds = [x[i : i + 1] for i in range(50)] + [poisoned]
            outcomes = await asyncio.gather(
                *(agent.infer({INPUT_NAME: f}) for f in feeds), return_exceptions=True
            )
            assert isinstance(outcomes[-1], InferenceFailedError)
            assert "non-finite" in str(outcomes[-1])
            good = [p for p in outcomes[:-1] if isinstance(p, Prediction)]
            assert [int(p.outputs[LABEL_OUTPUT][0]) for p in good] == expected[:50].tolist()
            assert agent.inference_errors == 1
            before += len(feeds)
            with pytest.raises(InvalidInputError, match="float32"):
                await agent.infer({INPUT_NAME: x[:1].astype(np.float64)})
            with pytest.raises(InvalidInputError, match="not the model's"):
                await agent.infer({"not-an-input": x[:1]})
            assert agent.inferences_total == before + len(x)

    asyncio.run(scenario())


def test_a_candidate_soaks_on_application_traffic_alone(
    home: Home,
    tmp_path: Path,
    demo_models: dict[str, DemoModel],
    digits_split: DigitsSplit,
) -> None:
    """No source of its own: the candidate is self-tested on zeros of its inputs, then
    judged healthy on the inferences applications asked for, which it answered."""
    stock(tmp_path, demo_models["digits-v1"], demo_models["digits-v2"])
    v1 = release_of(demo_models["digits-v1"])
    v2 = with_budget(release_of(demo_models["digits-v2"]), min_inferences=30)
    x = samples(digits_split, 1)

    async def scenario() -> None:
        async with device(home, tmp_path, None) as agent:
            await install(agent, home, v1)
            await deliver_manifest(agent, signed(home, 2, v1, v2))
            async with asyncio.timeout(GUARD_S):
                while (await agent.infer({INPUT_NAME: x})).release_id != v2.release_id:
                    pass  # v1 answers until the candidate is swapped in
                answered: set[str] = set()
                while not verdict_on(agent, "r1"):
                    answered.add((await agent.infer({INPUT_NAME: x})).release_id)
        assert answered == {v2.release_id}
        report = agent.last_health
        assert report is not None
        assert report.verdict is Verdict.HEALTHY
        assert report.inferences == 30
        assert agent.active_release == v2

    asyncio.run(scenario())


def test_the_config_is_bounded() -> None:
    with pytest.raises(ValueError, match="positive"):
        ServeConfig(max_connections=0)
    assert replace(ServeConfig(), port=0).port == 0
