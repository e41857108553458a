"""The simulated inputs an agent of the demo, the CLI or the tests sees: real held-out
data sets, streamed one sample at a time in a device-specific order."""

from __future__ import annotations

import itertools
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import numpy as np

from agent import Feed
from schemas import UsageError

__all__ = ["SOURCES", "Source", "cytology_source", "digits_source", "replay_source"]


# The simulated sources read their data through the model toolchain (the ``models``
# extra), imported when one is made, not when this module is: a device's lean install
# replays its own files instead.


def digits_source(seed: int) -> Iterator[Feed]:
    """A device's camera: real held-out digits, in a device-specific order.

    Raises:
        ModuleNotFoundError: the model toolchain (``edgefleet[models]``) is not installed.
    """
    from models import INPUT_NAME, DigitsStream  # noqa: PLC0415 (the models extra)

    stream = DigitsStream(seed=seed)
    return ({INPUT_NAME: np.asarray(sample, dtype=np.float32)} for sample in stream)


def cytology_source(seed: int) -> Iterator[Feed]:
    """A cart's cytology analyser: real held-out fine-needle aspirate measurements, one
    sample at a time in a device-specific order.

    Raises:
        ModuleNotFoundError: the model toolchain (``edgefleet[models]``) is not installed.
    """
    from models.datasets import load_cytology_split  # noqa: PLC0415 (the models extra)
    from models.export import CYTOLOGY_INPUT_NAME  # noqa: PLC0415

    x = load_cytology_split().x_holdout
    order = np.random.default_rng(seed).permutation(len(x))
    return ({CYTOLOGY_INPUT_NAME: x[i : i + 1].copy()} for i in itertools.cycle(order))


MAX_REPLAY_BYTES: Final = 256 * 1024 * 1024
"""A replay file is read whole into memory; a bigger one is refused."""


def replay_source(path: Path) -> Iterator[Feed]:
    """Inputs replayed from a ``.npz`` file in a loop: one member per model input, named
    after it, each ``(N, ...)`` with the same ``N``; one sample of each a call.

    Raises:
        UsageError: the file is too big, not an ``.npz`` of arrays, empty, or its
            members disagree on ``N``.
        OSError: the file cannot be read.
    """
    if path.stat().st_size > MAX_REPLAY_BYTES:
        msg = f"replay file {path}: over {MAX_REPLAY_BYTES >> 20} MiB"
        raise UsageError(msg)
    not_npz = f"replay file {path}: not an .npz of arrays"
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise UsageError(not_npz)
        with loaded as archive:
            inputs = {name: np.asarray(archive[name]) for name in archive.files[:16]}
    except (ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise UsageError(f"{not_npz} ({type(exc).__name__})") from None
    counts = {len(x) if x.ndim else 0 for x in inputs.values()}
    if not inputs or len(counts) != 1 or 0 in counts:
        msg = f"replay file {path}: needs members of the same (N, ...) shape, N >= 1"
        raise UsageError(msg)
    (n,) = counts
    return ({k: x[i : i + 1] for k, x in inputs.items()} for i in itertools.cycle(range(n)))


SOURCES: Final[dict[str, Callable[[int], Iterator[Feed]]]] = {
    "digits": digits_source,
    "cytology": cytology_source,
}
"""The simulated inputs a device can have, by name."""


class Source:
    """An iterator of feeds as the agent's input source (a callable)."""

    def __init__(self, frames: Iterator[Feed]) -> None:
        self._it = frames

    def __call__(self) -> Feed:
        return next(self._it)
