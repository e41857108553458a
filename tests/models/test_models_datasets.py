"""Tests for models.datasets: the digits split and the device camera stream."""

from __future__ import annotations

import time

import numpy as np
import pytest

from models.datasets import DigitsSplit, DigitsStream, load_digits_split


@pytest.fixture(scope="module")
def split() -> DigitsSplit:
    return load_digits_split()


def test_split_shapes_dtypes_and_range(split: DigitsSplit) -> None:
    assert split.x_train.shape == (1257, 64)
    assert split.x_holdout.shape == (540, 64)
    assert split.y_train.shape == (1257,)
    assert split.y_holdout.shape == (540,)
    assert split.x_train.dtype == np.float32
    assert split.x_holdout.dtype == np.float32
    assert split.y_train.dtype == np.int64
    assert split.y_holdout.dtype == np.int64
    for x in (split.x_train, split.x_holdout):
        assert float(x.min()) == 0.0
        assert float(x.max()) == 1.0


def test_split_is_stratified(split: DigitsSplit) -> None:
    train_frac = np.bincount(split.y_train, minlength=10) / len(split.y_train)
    hold_frac = np.bincount(split.y_holdout, minlength=10) / len(split.y_holdout)
    assert np.abs(train_frac - hold_frac).max() < 0.005


def test_split_is_deterministic_and_seeded(split: DigitsSplit) -> None:
    again = load_digits_split(0)
    np.testing.assert_array_equal(again.x_train, split.x_train)
    np.testing.assert_array_equal(again.y_holdout, split.y_holdout)
    other = load_digits_split(1)
    assert not np.array_equal(other.y_holdout, split.y_holdout)


def test_split_arrays_are_read_only(split: DigitsSplit) -> None:
    with pytest.raises(ValueError, match="read-only"):
        split.x_train[0, 0] = 0.5


def test_stream_without_noise_yields_holdout_rows(split: DigitsSplit) -> None:
    stream = DigitsStream(split, seed=3)
    assert stream.last_label is None
    seen = []
    for _ in range(len(split.y_holdout)):
        sample = next(stream)
        assert sample.shape == (1, 64)
        assert sample.dtype == np.float32
        matches = np.flatnonzero((split.x_holdout == sample).all(axis=1))
        assert matches.size > 0
        assert stream.last_label in set(split.y_holdout[matches].tolist())
        seen.append(sample)
    # One full pass visits every held-out sample once, then the stream cycles.
    assert (
        np.unique(np.concatenate(seen), axis=0).shape[0]
        == np.unique(split.x_holdout, axis=0).shape[0]
    )
    np.testing.assert_array_equal(next(stream), seen[0])


def test_stream_is_deterministic_with_noise(split: DigitsSplit) -> None:
    a = DigitsStream(split, seed=7, noise_std=0.05)
    b = DigitsStream(split, seed=7, noise_std=0.05)
    c = DigitsStream(split, seed=8, noise_std=0.05)
    xs_a = np.concatenate([next(a) for _ in range(50)])
    xs_b = np.concatenate([next(b) for _ in range(50)])
    xs_c = np.concatenate([next(c) for _ in range(50)])
    np.testing.assert_array_equal(xs_a, xs_b)
    assert not np.array_equal(xs_a, xs_c)
    assert xs_a.dtype == np.float32
    assert float(xs_a.min()) >= 0.0
    assert float(xs_a.max()) <= 1.0
    clean = next(DigitsStream(split, seed=7))  # same visiting order, no noise
    assert not np.array_equal(xs_a[:1], clean)
    assert np.abs(xs_a[:1] - clean).max() < 0.5


def test_stream_returns_independent_arrays(split: DigitsSplit) -> None:
    stream = DigitsStream(split, seed=0)
    first = next(stream)
    first[:] = -1.0
    assert float(split.x_holdout.min()) == 0.0


def test_stream_is_cheap(split: DigitsSplit) -> None:
    stream = DigitsStream(split, noise_std=0.02)
    start = time.perf_counter()
    for _ in range(10_000):
        next(stream)
    assert time.perf_counter() - start < 1.0  # typically ~30 ms


def test_stream_rejects_negative_noise(split: DigitsSplit) -> None:
    with pytest.raises(ValueError, match="noise_std"):
        DigitsStream(split, noise_std=-0.1)
