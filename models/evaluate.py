"""Running models with onnxruntime: sessions, labels, held-out accuracy, latency.

:class:`Classifier` is how the rest of :mod:`models` runs an arbitrary classification
model (a demo model, or any variant built from one): it checks that data fits the model's
one input, and reads labels the same way everywhere (see :meth:`Classifier.labels`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from models.export import INPUT_NAME, LABEL_OUTPUT

__all__ = [
    "CPU_PROVIDERS",
    "Classifier",
    "measure_accuracy",
    "measure_latency",
    "open_session",
    "session_accuracy",
]

CPU_PROVIDERS = ["CPUExecutionProvider"]
_FLOAT_INPUT = "tensor(float)"
_INTEGER_TYPES = frozenset({"tensor(int64)", "tensor(int32)", "tensor(int16)", "tensor(int8)"})
_INTEGER_TYPES |= {"tensor(uint64)", "tensor(uint32)", "tensor(uint16)", "tensor(uint8)"}
_FLOAT_TYPES = frozenset({"tensor(float)", "tensor(float16)", "tensor(double)"})


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
    """Fraction of rows of ``x`` whose ``label`` output equals ``y`` (input: the first one)."""
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need equally many samples and labels (> 0), got {len(x)}/{len(y)}")
    input_name = session.get_inputs()[0].name
    correct = 0
    for start in range(0, len(x), batch_size):
        batch = np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32)
        (labels,) = session.run([LABEL_OUTPUT], {input_name: batch})
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


class Classifier:
    """A classification model loaded in a CPU onnxruntime session (blocking calls).

    The model must have exactly one float32 input of shape ``(N, ...)`` with a dynamic
    batch dimension ``N``. Its labels are its first integer output of rank 1, or else the
    argmax of its first float output of rank 2 (the class scores, :attr:`scores_output`).
    """

    def __init__(self, model: bytes, *, intra_op_threads: int = 1) -> None:
        """Raises: ValueError when onnxruntime cannot load ``model`` or it is no classifier."""
        try:
            self.session = open_session(model, intra_op_threads=intra_op_threads)
        except Exception as exc:  # onnxruntime raises its own zoo of types
            raise ValueError(f"model does not load in onnxruntime: {exc}") from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"expected a model with one input, got {[i.name for i in inputs]}")
        (arg,) = inputs
        if arg.type != _FLOAT_INPUT:
            raise ValueError(f"input {arg.name!r} is {arg.type}, expected {_FLOAT_INPUT}")
        self.input_name: str = arg.name
        self.input_shape: tuple[int | str | None, ...] = tuple(arg.shape)
        if not self.input_shape or isinstance(self.input_shape[0], int):
            raise ValueError(
                f"input {arg.name!r} of shape {list(self.input_shape)} has no dynamic batch "
                "dimension (N, ...)"
            )
        outputs = self.session.get_outputs()
        self.output_names: tuple[str, ...] = tuple(o.name for o in outputs)
        self.label_output: str | None = next(
            (o.name for o in outputs if o.type in _INTEGER_TYPES and len(o.shape) == 1), None
        )
        self.scores_output: str | None = next(
            (o.name for o in outputs if o.type in _FLOAT_TYPES and len(o.shape) == 2), None
        )
        labels_from = self.label_output or self.scores_output
        if labels_from is None:
            described = [(o.name, o.type, o.shape) for o in outputs]
            raise ValueError(
                f"model has no label output (integer, rank 1) nor class scores (float, rank 2):"
                f" {described}"
            )
        self._labels_from = labels_from
        self._argmax = self.label_output is None

    def check_fits(self, x: npt.NDArray[np.generic], *, what: str = "data") -> None:
        """Raises: ValueError when rows of ``x`` do not have the model's input shape."""
        want = self.input_shape[1:]
        got = x.shape[1:]
        fits = len(want) == len(got) and all(
            not isinstance(w, int) or w == g for w, g in zip(want, got, strict=True)
        )
        if not fits:
            shown = ["N" if not isinstance(d, int) else d for d in self.input_shape]
            raise ValueError(
                f"{what} of shape {x.shape} does not fit input {self.input_name!r} of shape {shown}"
            )

    def run(self, x: npt.NDArray[np.float32]) -> dict[str, npt.NDArray[np.generic]]:
        """All outputs by name for the batch ``x``."""
        feed = {self.input_name: np.ascontiguousarray(x, dtype=np.float32)}
        return dict(zip(self.output_names, self.session.run(None, feed), strict=True))

    def scores(self, x: npt.NDArray[np.float32], *, batch_size: int = 256) -> npt.NDArray[Any]:
        """The class-scores output for every row of ``x``.

        Raises:
            ValueError: the model has no float output of rank 2.
        """
        if self.scores_output is None:
            raise ValueError("the model has no class-scores output (float, rank 2)")
        batches = [
            self.run(x[start : start + batch_size])[self.scores_output]
            for start in range(0, len(x), batch_size)
        ]
        return np.concatenate(batches)

    def labels(self, x: npt.NDArray[np.float32], *, batch_size: int = 256) -> npt.NDArray[np.int64]:
        """Predicted label of every row of ``x``."""
        out = []
        for start in range(0, len(x), batch_size):
            batch = np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32)
            feed = {self.input_name: batch}
            (found,) = self.session.run([self._labels_from], feed)
            labels = np.argmax(found, axis=1) if self._argmax else np.asarray(found)
            out.append(labels.astype(np.int64))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def accuracy(self, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]) -> float:
        """Fraction of rows of ``x`` whose label equals ``y``."""
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"need equally many samples and labels (> 0), got {len(x)}/{len(y)}")
        return float(np.count_nonzero(self.labels(x) == y)) / len(x)

    def latency_ms(
        self, x: npt.NDArray[np.float32], *, runs: int, warmup: int = 10
    ) -> tuple[float, float]:
        """``(p50, p95)`` in ms of single-sample ``run`` calls, cycling over the rows of ``x``."""
        if runs < 1 or len(x) == 0:
            raise ValueError("need runs >= 1 and at least one row")
        rows = [np.ascontiguousarray(x[i : i + 1], dtype=np.float32) for i in range(len(x))]
        name = self.input_name
        for i in range(warmup):
            self.session.run(None, {name: rows[i % len(rows)]})
        times = np.empty(runs, dtype=np.float64)
        for i in range(runs):
            feed = {name: rows[i % len(rows)]}
            start = time.perf_counter()
            self.session.run(None, feed)
            times[i] = time.perf_counter() - start
        p50, p95 = np.percentile(times, [50.0, 95.0]) * 1000.0
        return float(p50), float(p95)
