"""Data set files: real splits round-trip; every malformed file is refused with a reason."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models import DataSet, load_cytology_split, load_dataset, save_dataset
from models.datafile import Purpose
from schemas import UsageError


@pytest.fixture(scope="module")
def cytology() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    split = load_cytology_split()
    return split.x_train[:100], split.x_holdout, split.y_holdout


def test_round_trip_of_real_splits(
    tmp_path: Path, cytology: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    calibration, x, y = cytology
    path = tmp_path / "cytology.npz"
    save_dataset(path, calibration=calibration, holdout=(x, y))

    cal = load_dataset(path, "calibration")
    np.testing.assert_array_equal(cal.x, calibration)
    assert cal.x.dtype == np.float32
    assert cal.y is None
    assert str(path) in cal.source
    assert "calibration_x" in cal.source

    held = load_dataset(path, "holdout")
    np.testing.assert_array_equal(held.x, x)
    assert held.y is not None
    np.testing.assert_array_equal(held.y, y)
    assert held.y.dtype == np.int64
    assert "holdout_x" in held.source
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="read-only"):
        held.x[0, 0] = 1.0


def test_same_arrays_give_the_same_bytes(
    tmp_path: Path, cytology: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    calibration, x, y = cytology
    save_dataset(tmp_path / "a.npz", calibration=calibration, holdout=(x, y))
    save_dataset(tmp_path / "b.npz", calibration=calibration, holdout=(x, y))
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    save_dataset(tmp_path / "c.npz", calibration=calibration[:-1], holdout=(x, y))
    assert (tmp_path / "c.npz").read_bytes() != (tmp_path / "a.npz").read_bytes()


def test_plain_x_and_y_serve_both_purposes(
    tmp_path: Path, cytology: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    _, x, y = cytology
    path = tmp_path / "plain.npz"
    # As an operator would write it: float64 features, int32 labels.
    np.savez(path, x=x.astype(np.float64), y=y.astype(np.int32))
    purposes: tuple[Purpose, ...] = ("calibration", "holdout")
    for purpose in purposes:
        data = load_dataset(path, purpose)
        np.testing.assert_array_equal(data.x, x)
        assert data.x.dtype == np.float32
    held = load_dataset(path, "holdout")
    assert held.y is not None
    assert held.y.dtype == np.int64


def test_holdout_only_file_cannot_calibrate(
    tmp_path: Path, cytology: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    _, x, y = cytology
    path = tmp_path / "held.npz"
    save_dataset(path, holdout=(x, y))
    assert isinstance(load_dataset(path, "holdout"), DataSet)
    with pytest.raises(UsageError, match="no calibration split"):
        load_dataset(path, "calibration")


def _npz(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _npz_pickled() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.array([[{"a": 1}]], dtype=object))
    return buffer.getvalue()


X = np.ones((5, 3), dtype=np.float32)
Y = np.arange(5, dtype=np.int64)

# (file contents, purpose, what the message must say)
BAD_FILES: dict[str, tuple[Callable[[], bytes], Purpose, str]] = {
    "not an npz": (lambda: b"features,label\n1,2\n", "holdout", "not an npz"),
    "empty file": (lambda: b"", "calibration", "not an npz"),
    "a single npy": (lambda: _npy(X), "calibration", "single .npy"),
    "truncated npz": (lambda: _npz(x=X, y=Y)[:-40], "holdout", "not an npz"),
    "missing split": (lambda: _npz(other=X), "calibration", "no calibration split"),
    "missing holdout": (lambda: _npz(calibration_x=X), "holdout", "no holdout split"),
    "labels missing": (lambda: _npz(holdout_x=X), "holdout", "no labels"),
    "plain x without y": (lambda: _npz(x=X), "holdout", "no labels"),
    "length mismatch": (lambda: _npz(x=X, y=Y[:4]), "holdout", "4 labels for 5 samples"),
    "text inputs": (lambda: _npz(x=np.array([["a", "b"]])), "calibration", "must be numbers"),
    "object inputs": (_npz_pickled, "calibration", "cannot be read"),
    "rank 1 inputs": (lambda: _npz(x=np.ones(5)), "calibration", "must be (samples"),
    "no rows": (lambda: _npz(x=np.ones((0, 3))), "calibration", "no samples"),
    "no features": (lambda: _npz(x=np.ones((4, 0))), "calibration", "no samples"),
    "NaN input": (lambda: _npz(x=np.full((2, 3), np.nan)), "calibration", "NaN"),
    "float labels": (lambda: _npz(x=X, y=Y.astype(np.float64)), "holdout", "integers"),
    "rank 2 labels": (lambda: _npz(x=X, y=Y.reshape(5, 1)), "holdout", "must be (samples,)"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_malformed_file_is_refused(tmp_path: Path, case: str) -> None:
    contents, purpose, message = BAD_FILES[case]
    path = tmp_path / "data.npz"
    path.write_bytes(contents())
    with pytest.raises(UsageError, match=re.escape(message)) as refused:
        load_dataset(path, purpose)
    assert str(path) in str(refused.value)


def test_missing_file_is_refused_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "digits.npz"
    with pytest.raises(UsageError, match="does not exist") as refused:
        load_dataset(path, "holdout")
    assert str(path) in str(refused.value)


def test_save_refuses_nothing_and_what_load_would_refuse(tmp_path: Path) -> None:
    path = tmp_path / "out.npz"
    with pytest.raises(UsageError, match="nothing to save"):
        save_dataset(path)
    with pytest.raises(UsageError, match="3 labels for 5 samples"):
        save_dataset(path, holdout=(X, Y[:3]))
    with pytest.raises(UsageError, match="must be numbers"):
        save_dataset(path, calibration=np.array([["x"]]))
    assert not path.exists()


def test_save_leaves_the_callers_arrays_alone(tmp_path: Path) -> None:
    x = np.ones((3, 2), dtype=np.float32)
    y = np.zeros(3, dtype=np.int64)
    save_dataset(tmp_path / "d.npz", calibration=x, holdout=(x, y))
    assert x.flags.writeable
    assert y.flags.writeable
