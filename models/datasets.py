"""Real data for the demo models, bundled in the scikit-learn wheel (nothing is downloaded).

* digits (camera inspection): ``sklearn.datasets.load_digits``, 1797 8x8 images, 10 classes.
  Pixels are integers 0..16; we scale them to ``[0, 1]`` float32, which is also the input
  contract of every digits model (``pixels / 16``).
* cytology (diagnostic screening on medical carts): ``sklearn.datasets.load_breast_cancer``,
  569 rows of 30 raw float features (radius, texture, area, ... in their own units), 2 classes
  (0 = malignant, 1 = benign). Features stay raw: the cytology models standardise in the graph.

Both are split 70/30, stratified by label, with a fixed seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split

__all__ = [
    "CYTOLOGY_CLASSES",
    "CYTOLOGY_FEATURES",
    "HOLDOUT_FRACTION",
    "N_CLASSES",
    "N_FEATURES",
    "PIXEL_MAX",
    "CytologySplit",
    "DigitsSplit",
    "DigitsStream",
    "Split",
    "load_cytology_split",
    "load_digits_split",
]

N_FEATURES = 64
N_CLASSES = 10
PIXEL_MAX = 16.0
CYTOLOGY_FEATURES = 30
CYTOLOGY_CLASSES = 2
HOLDOUT_FRACTION = 0.3

_T = TypeVar("_T", bound=np.generic)


@dataclass(frozen=True, eq=False)
class Split:
    """A deterministic stratified train/held-out split (read-only arrays, labels 0..k-1)."""

    x_train: npt.NDArray[np.float32]
    y_train: npt.NDArray[np.int64]
    x_holdout: npt.NDArray[np.float32]
    y_holdout: npt.NDArray[np.int64]
    seed: int


class DigitsSplit(Split):
    """The digits split: ``(N, 64)`` pixels in ``[0, 1]``, labels 0..9."""


class CytologySplit(Split):
    """The cytology split: ``(N, 30)`` raw features, labels 0 (malignant) and 1 (benign)."""


def load_digits_split(seed: int = 0) -> DigitsSplit:
    """Load the bundled digits, scale to [0, 1] float32 and split 70/30, stratified by label.

    The same ``seed`` always yields the same split (1257 train / 540 held-out samples).
    """
    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float64) / PIXEL_MAX).astype(np.float32)
    x_train, y_train, x_holdout, y_holdout = _split(x, bunch.target, seed)
    return DigitsSplit(x_train, y_train, x_holdout, y_holdout, seed)


def load_cytology_split(seed: int = 0) -> CytologySplit:
    """Load the bundled breast cancer data as raw float32 features, split 70/30 stratified.

    The same ``seed`` always yields the same split (398 train / 171 held-out samples).
    """
    bunch = load_breast_cancer()
    x = np.asarray(bunch.data, dtype=np.float32)
    x_train, y_train, x_holdout, y_holdout = _split(x, bunch.target, seed)
    return CytologySplit(x_train, y_train, x_holdout, y_holdout, seed)


def _split(
    x: npt.NDArray[np.float32], target: object, seed: int
) -> tuple[
    npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int64]
]:
    """``(x_train, y_train, x_holdout, y_holdout)``, read-only."""
    y = np.asarray(target, dtype=np.int64)
    x_train, x_holdout, y_train, y_holdout = train_test_split(
        x, y, test_size=HOLDOUT_FRACTION, stratify=y, random_state=seed
    )
    return (
        _read_only(np.asarray(x_train, dtype=np.float32)),
        _read_only(np.asarray(y_train, dtype=np.int64)),
        _read_only(np.asarray(x_holdout, dtype=np.float32)),
        _read_only(np.asarray(y_holdout, dtype=np.int64)),
    )


def _read_only(arr: npt.NDArray[_T]) -> npt.NDArray[_T]:
    out = np.ascontiguousarray(arr)
    out.setflags(write=False)
    return out


class DigitsStream(Iterator[npt.NDArray[np.float32]]):
    """An endless, deterministic stream of held-out digits: a device's stand-in camera.

    Each ``next()`` returns a fresh ``(1, 64)`` float32 array in ``[0, 1]``. Samples are visited
    in a fixed seeded permutation of the held-out set, cycling forever. With ``noise_std > 0``,
    seeded Gaussian pixel noise is added and the result clipped back to ``[0, 1]``. Two streams
    built with the same arguments yield identical sequences. ``last_label`` is the true label
    of the most recently returned sample (for accuracy bookkeeping in simulations).
    """

    def __init__(
        self,
        split: DigitsSplit | None = None,
        *,
        seed: int = 0,
        noise_std: float = 0.0,
    ) -> None:
        if noise_std < 0.0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        data = split if split is not None else load_digits_split()
        self._x = data.x_holdout
        self._y = data.y_holdout
        self._noise_std = float(noise_std)
        self._rng = np.random.default_rng(seed)
        self._order = self._rng.permutation(len(self._y))
        self._pos = 0
        self._last_label: int | None = None

    @property
    def last_label(self) -> int | None:
        """True label of the sample returned by the latest ``next()`` (None before the first)."""
        return self._last_label

    def __iter__(self) -> DigitsStream:
        return self

    def __next__(self) -> npt.NDArray[np.float32]:
        idx = int(self._order[self._pos])
        self._pos = (self._pos + 1) % len(self._order)
        sample = self._x[idx : idx + 1].copy()
        if self._noise_std > 0.0:
            noise = self._rng.standard_normal(sample.shape, dtype=np.float32)
            sample += noise * np.float32(self._noise_std)
            np.clip(sample, 0.0, 1.0, out=sample)
        self._last_label = int(self._y[idx])
        return sample
