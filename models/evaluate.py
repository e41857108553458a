"""Running exported models with onnxruntime: sessions, held-out accuracy, latency."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from models.export import INPUT_NAME, LABEL_OUTPUT

__all__ = ["measure_accuracy", "measure_latency", "open_session"]

CPU_PROVIDERS = ["CPUExecutionProvider"]


def open_session(model: Path | bytes, *, intra_op_threads: int = 0) -> ort.InferenceSession:
    """A CPU-only onnxruntime session for a model file or serialized model bytes.

    ``intra_op_threads=0`` lets onnxruntime pick (one per physical core); devices and latency
    measurements use 1.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, sess_options=options, providers=CPU_PROVIDERS)


def session_accuracy(
    session: ort.InferenceSession,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
    *,
    batch_size: int = 256,
) -> float:
    """Fraction of rows of ``x`` whose ``label`` output equals ``y``."""
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need equally many samples and labels (> 0), got {len(x)}/{len(y)}")
    correct = 0
    for start in range(0, len(x), batch_size):
        batch = np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32)
        (labels,) = session.run([LABEL_OUTPUT], {INPUT_NAME: batch})
        correct += int(np.count_nonzero(np.asarray(labels) == y[start : start + batch_size]))
    return correct / len(x)


def measure_accuracy(
    model_path: Path, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]
) -> float:
    """Accuracy of the ONNX model at ``model_path`` on ``(x, y)``, run with onnxruntime."""
    return session_accuracy(open_session(model_path), x, y)


def measure_latency(
    model_path: Path,
    sample: npt.NDArray[np.float32],
    *,
    runs: int = 30,
    warmup: int = 3,
    intra_op_threads: int = 1,
) -> float:
    """Median wall time in seconds of ``session.run`` on ``sample`` (after ``warmup`` runs)."""
    if runs < 1:
        raise ValueError("runs must be >= 1")
    session = open_session(model_path, intra_op_threads=intra_op_threads)
    feed = {INPUT_NAME: np.ascontiguousarray(sample, dtype=np.float32)}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times))
