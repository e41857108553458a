"""A folder as the device's input: files dropped into it are inferred once each, and
each answer is written beside them.

Theory of operation. An application, a camera's uploader or an operator drops files
into the inbox (writing them under a name starting with ``.`` or ending in ``.part``
or ``.tmp``, then renaming them, so that no half-written file is read). The inbox
takes them oldest first and asks the serving model through :meth:`agent.Agent.infer`,
so they are counted like every other inference (telemetry, a soak). For each file:

* ``results/NAME.json``: the outputs, the release that gave them, when;
* then the file moves to ``done/`` (to ``failed/`` with ``failed/NAME.error.txt`` when
  it cannot be read, does not fit the model, or the model fails on it).

An answer is durable (written and synced, ``storage.atomic_write``) before its file
moves: a crash between the two answers the file again, at least once, and never loses an
answer. No model yet, or too many inferences waiting: the file waits for its turn.
``done/``, ``failed/`` and ``results/`` keep the newest ``keep`` files each.

Files:

* ``.npy``: one array, for a model with one input; without the batch axis it gets one.
* ``.npz``: one array per model input, named after it.
* images (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.pgm``, ``.ppm``; needs Pillow,
  ``edgefleet[images]``), for a model with one input shaped ``(N, C, H, W)``,
  ``(N, H, W, C)`` (``C`` 1 or 3), ``(N, H, W)`` or ``(N, S*S)`` (a flattened square
  grey image): resized to fit, each pixel times ``image_scale``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from agent.inference import NotReadyError, OverloadedError, Prediction
from agent.runtime import Feed, InferenceError, Inputs
from schemas import Release
from schemas.errors import bound_text
from storage import atomic_write

__all__ = [
    "IMAGE_SUFFIXES",
    "FolderInbox",
    "InboxConfig",
    "UnreadableInputError",
    "read_input",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES: Final = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm"})
_SUFFIXES: Final = IMAGE_SUFFIXES | {".npy", ".npz"}
_HIDDEN: Final = (".part", ".tmp")
_SCAN_MAX: Final = 4096
"""Names looked at in one scan of the inbox (the oldest of them go first)."""
_ERROR_CHARS: Final = 500


class UnreadableInputError(ValueError):
    """A file in the inbox that is no input of the serving model (says why)."""


@dataclass(frozen=True, kw_only=True)
class InboxConfig:
    root: Path
    poll_s: float = 0.5
    """How often the inbox is looked at while it is empty."""
    keep: int = 1000
    """Files kept in each of ``done/``, ``failed/`` and ``results/``."""
    max_file_bytes: int = 64 * 1024 * 1024
    image_scale: float = 1.0 / 255.0
    """What a pixel's 0..255 value is multiplied by."""


def _one_input(release: Release, kind: str) -> tuple[str, tuple[int | str | None, ...], str]:
    if len(release.inputs) != 1:
        names = ", ".join(t.name for t in release.inputs)
        msg = f"{kind} fits a model of one input; this one takes {names} (use .npz)"
        raise UnreadableInputError(msg)
    spec = release.inputs[0]
    return spec.name, tuple(spec.shape), spec.dtype


def _fit(
    array: npt.NDArray[np.generic], shape: tuple[int | str | None, ...], dtype: str
) -> npt.NDArray[np.generic]:
    """``array`` as the model's input: a batch axis added if missing, in its dtype."""
    if array.ndim == len(shape) - 1:
        array = array[np.newaxis]
    try:
        return np.ascontiguousarray(array, dtype=np.dtype(dtype))
    except (TypeError, ValueError) as exc:
        msg = f"cannot be read as {dtype}: {exc}"
        raise UnreadableInputError(msg) from None


def _image_layout(shape: tuple[int | str | None, ...]) -> tuple[int, int, int, str]:
    """Height, width, channels and layout (``nchw``, ``nhwc``, ``nhw``, ``flat``)."""
    sizes = [d for d in shape[1:] if isinstance(d, int)]
    if len(sizes) != len(shape) - 1:
        msg = f"an image needs fixed input sizes, not {list(shape)}"
        raise UnreadableInputError(msg)
    if len(sizes) == 3 and sizes[0] in (1, 3):
        return sizes[1], sizes[2], sizes[0], "nchw"
    if len(sizes) == 3 and sizes[2] in (1, 3):
        return sizes[0], sizes[1], sizes[2], "nhwc"
    if len(sizes) == 2:
        return sizes[0], sizes[1], 1, "nhw"
    side = math.isqrt(sizes[0]) if len(sizes) == 1 else 0
    if side and side * side == sizes[0]:
        return side, side, 1, "flat"
    msg = f"no image layout fits input shape {list(shape)}"
    raise UnreadableInputError(msg)


def _read_image(
    path: Path, shape: tuple[int | str | None, ...], scale: float
) -> npt.NDArray[np.float64]:
    try:
        from PIL import Image  # noqa: PLC0415 (the images extra)
    except ModuleNotFoundError:
        msg = "images need Pillow: install edgefleet[images]"
        raise UnreadableInputError(msg) from None
    height, width, channels, layout = _image_layout(shape)
    try:
        with Image.open(path) as image:
            image.draft("RGB" if channels == 3 else "L", (width, height))
            pixels = image.convert("RGB" if channels == 3 else "L").resize((width, height))
            array = np.asarray(pixels, dtype=np.float64) * scale
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        msg = f"not an image Pillow reads: {exc}"
        raise UnreadableInputError(msg) from None
    if layout == "flat":
        return array.reshape(1, -1)
    if layout == "nhw":
        return array[np.newaxis]
    array = array.reshape(height, width, channels)
    return (array.transpose(2, 0, 1) if layout == "nchw" else array)[np.newaxis]


def read_input(path: Path, release: Release, image_scale: float = 1.0 / 255.0) -> Feed:
    """The serving model's input from the file at ``path`` (blocking: call it in a
    thread).

    Raises:
        UnreadableInputError: the file is no input of this model (why).
        OSError: the file cannot be read.
    """
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                wanted = {t.name: t for t in release.inputs}
                missing = sorted(set(wanted) - set(archive.files))
                if missing:
                    msg = f"no member for input(s) {', '.join(missing)}"
                    raise UnreadableInputError(msg)
                feed: Feed = {}
                for name, spec in wanted.items():
                    feed[name] = _fit(archive[name], tuple(spec.shape), spec.dtype)
                return feed
        name, shape, dtype = _one_input(release, suffix)
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            array = _read_image(path, shape, image_scale)
        return {name: _fit(np.asarray(array), shape, dtype)}
    except (ValueError, EOFError) as exc:
        if isinstance(exc, UnreadableInputError):
            raise
        msg = f"not a numpy file: {exc}"
        raise UnreadableInputError(msg) from None


def _answer(prediction: Prediction, name: str, now: float) -> str:
    outputs = {k: v.tolist() for k, v in prediction.outputs.items()}
    return json.dumps(
        {"file": name, "release": prediction.release_id, "outputs": outputs, "at": now}
    )


class FolderInbox:
    """Infers every file dropped into ``config.root`` once (see the module's docstring)."""

    def __init__(
        self,
        config: InboxConfig,
        *,
        infer: Callable[[Inputs], Awaitable[Prediction]],
        release: Callable[[], Release | None],
        until_serving: Callable[[], Awaitable[None]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._infer = infer
        self._release = release
        self._until_serving = until_serving
        self._clock = clock
        root = config.root
        self.done, self.failed, self.results = root / "done", root / "failed", root / "results"
        self.answered = 0
        self.refused = 0

    def _make_folders(self) -> None:
        for folder in (self.done, self.failed, self.results):
            folder.mkdir(parents=True, exist_ok=True)

    def waiting(self) -> list[Path]:
        """The files waiting, oldest first (blocking)."""
        entries: list[tuple[float, str, Path]] = []
        with os.scandir(self._config.root) as scan:
            for entry in scan:
                name = entry.name
                if name.startswith(".") or name.endswith(_HIDDEN):
                    continue
                if Path(name).suffix.lower() not in _SUFFIXES:
                    continue
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    entries.append((entry.stat().st_mtime, name, Path(entry.path)))
                except OSError:
                    continue
                if len(entries) >= _SCAN_MAX:
                    break
        return [path for *_, path in sorted(entries)]

    async def run(self) -> None:
        """Answer files as they come, until cancelled."""
        await asyncio.to_thread(self._make_folders)
        while True:
            files = await asyncio.to_thread(self.waiting)
            if not files:
                await asyncio.sleep(self._config.poll_s)
                continue
            for path in files:
                await self._take(path)
            await asyncio.to_thread(self._prune)

    async def _take(self, path: Path) -> None:
        release = self._release()
        if release is None:
            await self._until_serving()
            return  # and its turn comes again
        try:
            feed = await asyncio.to_thread(self._read, path, release)
            prediction = await self._infer(feed)
        except (NotReadyError, OverloadedError):
            await asyncio.sleep(self._config.poll_s)  # its turn comes again
        except (UnreadableInputError, InferenceError, OSError) as exc:
            await asyncio.to_thread(self._refuse, path, str(exc))
        else:
            text = _answer(prediction, path.name, self._clock())
            await asyncio.to_thread(self._answered, path, text)

    def _read(self, path: Path, release: Release) -> Feed:
        size = path.stat().st_size
        if size > self._config.max_file_bytes:
            msg = f"{size} bytes, over the {self._config.max_file_bytes} an input may have"
            raise UnreadableInputError(msg)
        return read_input(path, release, self._config.image_scale)

    def _answered(self, path: Path, text: str) -> None:
        atomic_write(self.results / f"{path.name}.json", text.encode())
        path.replace(self.done / path.name)
        self.answered += 1

    def _refuse(self, path: Path, why: str) -> None:
        why = bound_text(why, _ERROR_CHARS)
        log.warning("inbox: %s refused: %s", path.name, why)
        try:
            atomic_write(self.failed / f"{path.name}.error.txt", f"{why}\n".encode())
            path.replace(self.failed / path.name)
        except FileNotFoundError:
            return  # taken away meanwhile
        self.refused += 1

    def _prune(self) -> None:
        keep = self._config.keep
        for folder in (self.done, self.failed, self.results):
            _keep_newest(folder, keep * (2 if folder is self.failed else 1))


def _keep_newest(folder: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` files of ``folder``."""
    stamped: list[tuple[float, Path]] = []
    with os.scandir(folder) as scan:
        for entry in scan:
            try:
                stamped.append((entry.stat().st_mtime, Path(entry.path)))
            except OSError:
                continue
    if len(stamped) <= keep:
        return
    stamped.sort(reverse=True)
    for _, path in stamped[keep:]:
        path.unlink(missing_ok=True)
