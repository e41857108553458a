"""The folder inbox: files dropped into a folder are answered once each by the model
the fleet rolled out, through a real agent (no broker: trust and manifests are handed
to it) and real models; answers are checked against onnxruntime run directly."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from agent.folder import FolderInbox, InboxConfig, UnreadableInputError, read_input
from edgefleet.home import Home
from models import INPUT_NAME, DemoModel, DigitsSplit
from models.export import LABEL_OUTPUT
from schemas import Release, TensorSpec
from tests.agent.conftest import release_of
from tests.agent.test_agent_serve import device, direct, install, samples
from tests.agent.test_agent_service import GUARD_S, stock
from tests.agent.test_agent_service import home as home  # noqa: PLC0414 (the fixture)


def _png(path: Path, pixels: np.ndarray) -> None:
    """A digit (64 values in [0, 1]) as the 8x8 grey image a camera would save."""
    grey = np.rint(pixels.reshape(8, 8) * 255).astype(np.uint8)
    Image.fromarray(grey, mode="L").save(path)


def test_npy_npz_and_images_become_the_models_input(
    tmp_path: Path, v1_release: Release, digits_split: DigitsSplit
) -> None:
    x = samples(digits_split, 2)
    np.save(tmp_path / "one.npy", x[0].astype(np.float64))  # no batch axis, float64
    feed = read_input(tmp_path / "one.npy", v1_release)
    assert feed[INPUT_NAME].shape == (1, 64)
    assert feed[INPUT_NAME].dtype == np.float32
    np.testing.assert_allclose(np.asarray(feed[INPUT_NAME], np.float32), x[:1])
    members: dict[str, Any] = {INPUT_NAME: x}
    np.savez(tmp_path / "two.npz", **members)
    assert read_input(tmp_path / "two.npz", v1_release)[INPUT_NAME].shape == (2, 64)
    _png(tmp_path / "three.png", x[1])
    image = np.asarray(read_input(tmp_path / "three.png", v1_release)[INPUT_NAME], np.float32)
    np.testing.assert_allclose(image, x[1:2], atol=1 / 255)


def test_files_that_are_no_input_of_the_model_say_why(tmp_path: Path, v1_release: Release) -> None:
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(UnreadableInputError, match="not a numpy file"):
        read_input(tmp_path / "junk.npy", v1_release)
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(UnreadableInputError, match="not an image"):
        read_input(tmp_path / "junk.png", v1_release)
    np.savez(tmp_path / "wrong.npz", other=np.zeros((1, 64), dtype=np.float32))
    with pytest.raises(UnreadableInputError, match=f"no member for input.*{INPUT_NAME}"):
        read_input(tmp_path / "wrong.npz", v1_release)
    spec = TensorSpec(name="extra", dtype="float32", shape=("N", 4))
    two_inputs = v1_release.model_copy(update={"inputs": (*v1_release.inputs, spec)})
    np.save(tmp_path / "one.npy", np.zeros(64, dtype=np.float32))
    with pytest.raises(UnreadableInputError, match="one input"):
        read_input(tmp_path / "one.npy", two_inputs)


def test_dropped_files_are_answered_once_counted_and_moved(
    home: Home, tmp_path: Path, demo_models: dict[str, DemoModel], digits_split: DigitsSplit
) -> None:
    model = demo_models["digits-v1"]
    data, inbox_dir = tmp_path / "data", tmp_path / "inbox"
    stock(data, model)
    inbox_dir.mkdir()
    x = samples(digits_split, 6)
    expected = direct(model, x)[LABEL_OUTPUT].tolist()
    for i in range(3):
        np.save(inbox_dir / f"frame-{i}.npy", x[i])
    for i in range(3, 6):
        _png(inbox_dir / f"frame-{i}.png", x[i])
    (inbox_dir / "broken.npy").write_bytes(b"not numpy")
    (inbox_dir / "frame-9.npy.part").write_bytes(b"still being written")

    async def scenario() -> None:
        async with device(home, data, None) as agent:

            def inbox() -> FolderInbox:
                return FolderInbox(
                    InboxConfig(root=inbox_dir, poll_s=0.05),
                    infer=agent.infer,
                    release=lambda: agent.active_release,
                    until_serving=agent.until_serving,
                )

            waiting = inbox()
            async with asyncio.timeout(GUARD_S), asyncio.TaskGroup() as tg:
                task = tg.create_task(waiting.run())
                await asyncio.sleep(0.3)
                task.cancel()
            assert waiting.answered == waiting.refused == 0, "no model serves yet: files wait"
            await install(agent, home, release_of(model))
            before, taking = agent.inferences_total, inbox()
            async with asyncio.timeout(GUARD_S), asyncio.TaskGroup() as tg:
                task = tg.create_task(taking.run())
                while taking.answered + taking.refused < 7:  # noqa: ASYNC110 (a test's poll)
                    await asyncio.sleep(0.05)
                task.cancel()
            assert (taking.answered, taking.refused) == (6, 1)
            assert agent.inferences_total == before + 6

    asyncio.run(scenario())
    release_id = release_of(model).release_id
    for i, suffix in enumerate(["npy"] * 3 + ["png"] * 3):
        name = f"frame-{i}.{suffix}"
        answer = json.loads((inbox_dir / "results" / f"{name}.json").read_text())
        assert (answer["file"], answer["release"]) == (name, release_id)
        assert answer["outputs"][LABEL_OUTPUT] == [expected[i]]
        assert (inbox_dir / "done" / name).exists()
        assert not (inbox_dir / name).exists()
    error = (inbox_dir / "failed" / "broken.npy.error.txt").read_text()
    assert "not a numpy file" in error
    assert (inbox_dir / "frame-9.npy.part").exists(), "a file being written is left alone"
