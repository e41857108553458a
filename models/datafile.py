"""Data set files: the real inputs models are quantised with and judged on.

A data set file is an ``.npz`` archive (read with ``allow_pickle=False``) of named splits:

* ``calibration_x``: unlabelled inputs for quantisation calibration;
* ``holdout_x`` and ``holdout_y``: labelled held-out data for the accuracy gate;
* or plain ``x`` (with ``y`` when labelled): one split usable for either purpose.

Inputs are ``(N, ...)`` with ``N >= 1`` samples of numbers (read as float32); labels are
``(N,)`` integers (read as int64). :func:`load_dataset` checks a file in that order and
raises :class:`~schemas.UsageError` naming the file and what is wrong, since these files are
named by operators on the command line and in class profiles.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import numpy.typing as npt

from schemas import UsageError
from storage import atomic_write

__all__ = ["DataSet", "Purpose", "load_dataset", "save_dataset"]

Purpose = Literal["calibration", "holdout"]

# npz members are zip entries stamped with the time of writing; a fixed stamp makes the
# same arrays give the same bytes (and sha256) every time.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True, eq=False)
class DataSet:
    """One split of a data set file: inputs, labels when present, and where it came from."""

    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64] | None
    source: str
    """File path and split, for messages."""


def save_dataset(
    path: Path,
    *,
    calibration: npt.NDArray[np.generic] | None = None,
    holdout: tuple[npt.NDArray[np.generic], npt.NDArray[np.generic]] | None = None,
) -> None:
    """Write a data set file atomically: ``calibration_x`` and/or ``holdout_x``/``holdout_y``.

    The same arrays always give the same bytes.

    Raises:
        UsageError: neither split given, or arrays :func:`load_dataset` would refuse.
    """
    arrays: dict[str, npt.NDArray[np.generic]] = {}
    if calibration is not None:
        arrays["calibration_x"] = _inputs(np.asarray(calibration), f"{path} calibration_x")
    if holdout is not None:
        x, y = holdout
        where = f"{path} holdout"
        arrays["holdout_x"] = _inputs(np.asarray(x), f"{where}_x")
        arrays["holdout_y"] = _labels(np.asarray(y), len(arrays["holdout_x"]), f"{where}_y")
    if not arrays:
        raise UsageError(f"{path}: nothing to save, give calibration and/or holdout data")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            member = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
            with archive.open(member, "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, array, allow_pickle=False)
    atomic_write(path, buffer.getvalue())


def load_dataset(path: Path, purpose: Purpose) -> DataSet:
    """The split of the file at ``path`` for ``purpose``: ``calibration_x`` (else ``x``) for
    calibration; ``holdout_x`` with ``holdout_y`` (else ``x`` with ``y``) for holdout.

    Raises:
        UsageError: the file is missing or not an npz archive; it has no split for
            ``purpose``; holdout labels are missing; inputs are not numbers, not of rank
            >= 2, not finite, or empty; labels are not integers of rank 1 or their count
            differs from the inputs'.
    """
    if not path.is_file():
        problem = "is not a file" if path.exists() else "does not exist"
        raise UsageError(f"data set file {path} {problem}")
    # The file is opened here, not by np.load, which leaks its handle on a damaged zip.
    try:
        with path.open("rb") as handle:
            return _read(handle, path, purpose)
    except OSError as exc:
        raise UsageError(f"cannot read data set file {path}: {exc}") from exc


def _read(handle: BinaryIO, path: Path, purpose: Purpose) -> DataSet:
    try:
        archive = np.load(handle, allow_pickle=False)
    except (ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise UsageError(f"{path} is not an npz data set file: {exc}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise UsageError(f"{path} is a single .npy array, not an npz data set file")
    with archive:
        names = set(archive.files)
        if purpose == "calibration":
            x_name = "calibration_x" if "calibration_x" in names else "x"
            y_name = None
        else:
            x_name, y_name = ("holdout_x", "holdout_y") if "holdout_x" in names else ("x", "y")
        if x_name not in names:
            wanted = "calibration_x or x" if purpose == "calibration" else "holdout_x or x"
            found = ", ".join(sorted(names)) or "nothing"
            raise UsageError(f"{path} has no {purpose} split ({wanted}); it holds {found}")
        if y_name is not None and y_name not in names:
            raise UsageError(f"{path} has {x_name} but no labels ({y_name}) for held-out use")
        x = _inputs(_member(archive, x_name, path), f"{path} {x_name}")
        y = None
        if y_name is not None:
            y = _labels(_member(archive, y_name, path), len(x), f"{path} {y_name}")
    source = f"{path} [{x_name}]" if y_name is None else f"{path} [{x_name}, {y_name}]"
    return DataSet(x=x, y=y, source=source)


def _member(archive: np.lib.npyio.NpzFile, name: str, path: Path) -> npt.NDArray[np.generic]:
    try:
        array: npt.NDArray[np.generic] = archive[name]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        # Object arrays need pickle, which we refuse; a damaged member fails here too.
        raise UsageError(f"{path}: {name} cannot be read as a plain array: {exc}") from exc
    return array


def _inputs(x: npt.NDArray[np.generic], where: str) -> npt.NDArray[np.float32]:
    if x.dtype.kind not in "iuf":
        raise UsageError(f"{where}: inputs must be numbers, got dtype {x.dtype}")
    if x.ndim < 2:
        raise UsageError(f"{where}: inputs must be (samples, features...), got shape {x.shape}")
    if x.shape[0] == 0 or x.size == 0:
        raise UsageError(f"{where}: no samples (shape {x.shape})")
    out = np.array(x, dtype=np.float32, order="C")  # a copy: the caller's array stays writable
    if not np.all(np.isfinite(out)):
        raise UsageError(f"{where}: inputs contain NaN or infinity (as float32)")
    out.setflags(write=False)
    return out


def _labels(y: npt.NDArray[np.generic], samples: int, where: str) -> npt.NDArray[np.int64]:
    if y.dtype.kind not in "iu":
        raise UsageError(f"{where}: labels must be integers, got dtype {y.dtype}")
    if y.ndim != 1:
        raise UsageError(f"{where}: labels must be (samples,), got shape {y.shape}")
    if len(y) != samples:
        raise UsageError(f"{where}: {len(y)} labels for {samples} samples")
    out = np.array(y, dtype=np.int64, order="C")
    out.setflags(write=False)
    return out
