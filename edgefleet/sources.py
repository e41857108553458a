"""The simulated inputs an agent of the demo, the CLI or the tests sees: real held-out
data sets, streamed one sample at a time in a device-specific order."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Final

import numpy as np

from agent import Feed
from models import INPUT_NAME, DigitsStream
from models.datasets import load_cytology_split
from models.export import CYTOLOGY_INPUT_NAME

__all__ = ["SOURCES", "Source", "cytology_source", "digits_source"]


def digits_source(seed: int) -> Iterator[Feed]:
    """A device's camera: real held-out digits, in a device-specific order."""
    stream = DigitsStream(seed=seed)
    for sample in stream:
        yield {INPUT_NAME: np.asarray(sample, dtype=np.float32)}


def cytology_source(seed: int) -> Iterator[Feed]:
    """A cart's cytology analyser: real held-out fine-needle aspirate measurements, one
    sample at a time in a device-specific order."""
    x = load_cytology_split().x_holdout
    order = np.random.default_rng(seed).permutation(len(x))
    for index in itertools.cycle(order):
        yield {CYTOLOGY_INPUT_NAME: x[index : index + 1].copy()}


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
