"""Loading and running one model in onnxruntime: a serving slot.

Loading, self-testing and running all block (they are onnxruntime calls), so the
agent calls them from threads. A slot is only built from a file whose sha256 was
verified against a signed manifest, and a golden set is only read from such a file.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from agent.providers import open_session
from schemas import (
    ArtifactError,
    GoldenSet,
    MalformedPayloadError,
    Reason,
    Release,
    decode,
    golden_mismatches,
)
from schemas.errors import bound_text
from schemas.golden import MAX_GOLDEN_BYTES
from schemas.manifest import dtype_name

__all__ = [
    "Feed",
    "InferenceError",
    "InferenceResult",
    "Inputs",
    "InvalidInputError",
    "ModelSlot",
    "Outputs",
    "Tally",
    "read_golden",
]

Feed = dict[str, npt.NDArray[np.generic]]
Outputs = dict[str, npt.NDArray[np.generic]]
Inputs = Mapping[str, npt.NDArray[np.generic]]
"""What an application hands in: an array for each of the model's inputs, by name."""

_MAX_NAMES_SHOWN = 8
_TEXT = 300
"""The longest text an input's mistake is told in (names come from the caller)."""


class InferenceError(Exception):
    """Why an inference asked of the device gave no answer (the root of that tree)."""


class InvalidInputError(InferenceError, ValueError):
    """The inputs do not fit the serving release's declared inputs: the caller's mistake,
    told before the model runs, and not counted as an inference of the model."""


def _numpy_dtype(name: str) -> np.dtype[np.generic] | None:
    """The numpy type of a declared tensor type, None for one numpy has no name for."""
    try:
        return np.dtype(name)
    except TypeError:
        return None


def _fixed_sizes(
    shape: tuple[int | str | None, ...],
) -> tuple[int, tuple[int, ...], tuple[tuple[int, int], ...]]:
    """The fixed sizes of a declared shape, as :meth:`ModelSlot.check_feed` compares them:
    where its fixed tail starts, that tail, and the fixed sizes before it by axis."""
    start = len(shape)
    while start and isinstance(shape[start - 1], int):
        start -= 1
    tail = tuple(dim for dim in shape[start:] if isinstance(dim, int))
    others = tuple((axis, dim) for axis, dim in enumerate(shape[:start]) if isinstance(dim, int))
    return start, tail, others


def read_golden(path: Path) -> GoldenSet:
    """The golden set in a verified artifact file.

    Raises:
        ArtifactError: MALFORMED when the file is not a golden set.
    """
    try:
        return decode(path.read_bytes(), GoldenSet, max_bytes=MAX_GOLDEN_BYTES)
    except MalformedPayloadError as exc:
        raise ArtifactError(Reason.MALFORMED, f"golden set does not decode: {exc}") from exc


@dataclass(frozen=True, kw_only=True)
class InferenceResult:
    latency_ms: float
    confidence: float | None
    label: int | None


@dataclass(slots=True, eq=False)
class Tally:
    """Inferences of one release counted together (a batch, or one): what telemetry and
    the soak count of them. Each answer counts the latency of the model call it was part
    of, and its first row's confidence and label (see :meth:`ModelSlot.first_rows`)."""

    release_id: str
    sha256: str
    """The model's (its artifact's digest)."""
    runs: list[tuple[float, int]] = field(default_factory=list)
    """``(latency in ms, answers)`` per model call: the answers of a batch share its call."""
    answered: int = 0
    errors: int = 0
    """Inferences that failed (the model, non-finite outputs, the input source)."""
    confidences: list[float] = field(default_factory=list)
    labels: Counter[int] = field(default_factory=Counter)
    compared: int = 0
    """Of a shadow's answers, those compared with the serving model's ..."""
    agreed: int = 0
    """... and of them, those that agreed (:func:`agent.shadow.agrees`)."""

    @property
    def count(self) -> int:
        return self.answered + self.errors

    def add(self, result: InferenceResult | None) -> None:
        """Count one inference; ``None`` is a failed one."""
        if result is None:
            self.errors += 1
            return
        self.answered += 1
        self.runs.append((result.latency_ms, 1))
        if result.confidence is not None:
            self.confidences.append(result.confidence)
        if result.label is not None:
            self.labels[result.label] += 1

    def add_batch(
        self,
        latency_ms: float,
        answers: int,
        confidences: list[float] | None,
        labels: list[int] | None,
    ) -> None:
        """Count ``answers`` of one model call (:meth:`ModelSlot.first_rows`)."""
        self.answered += answers
        self.runs.append((latency_ms, answers))
        if confidences is not None:
            self.confidences += confidences
        if labels is not None:
            self.labels.update(labels)


class ModelSlot:
    """One loaded model, ready to serve."""

    def __init__(
        self, release: Release, path: Path, *, providers: Sequence[str] | None = None
    ) -> None:
        """Load the model on the first of the release's execution providers that takes
        it (``providers``: the device's own list instead), and check it matches the
        release's declared I/O. :attr:`fallback` says why it is not the first.

        Raises:
            ArtifactError: MODEL_LOAD_FAILED when no provider opens the file, its
                inputs/outputs are not those the release declares, or it opens only on
                a fallback provider and the release refuses that.
        """
        self.release = release
        runtime = release.runtime
        options = ort.SessionOptions()
        options.intra_op_num_threads = runtime.intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        opened = open_session(path, options, providers or runtime.providers)
        if opened.fallback is not None and runtime.on_fallback == "refuse":
            raise ArtifactError(
                Reason.MODEL_LOAD_FAILED, f"release refuses a fallback: {opened.fallback}"
            )
        self._session = opened.session
        self.fallback = opened.fallback
        """Why the model serves on a later provider than the first (None: it does not)."""
        self._check_io()
        self.providers = tuple(self._session.get_providers())
        self.release_id = release.release_id
        self.sha256 = release.artifact.sha256
        self._output_names = [o.name for o in release.outputs]
        self._inputs = {t.name: (_numpy_dtype(t.dtype), t.shape) for t in release.inputs}
        self._checks = [
            (name, dtype, len(shape), *_fixed_sizes(shape))
            for name, (dtype, shape) in self._inputs.items()
        ]
        leading = [t.shape[0] if t.shape else 1 for t in (*release.inputs, *release.outputs)]
        leading += [i.shape[0] if i.shape else 1 for i in self._session.get_inputs()]
        self.batchable = not any(isinstance(dim, int) for dim in leading)
        """Whether feeds may be stacked along the first axis and run as one: every
        declared and actual input, and every declared output, has a free first dimension."""
        (name, dtype, rank, start, tail, others), *more = self._checks  # one input at least
        lone = not more and self.batchable and dtype is not None and start == 1 and not others
        self._lone = (name, dtype, rank, tail) if lone else None
        """A batchable model's only input, if its sizes past the first are all fixed."""
        self.uniform = self.batchable and all(
            dtype is not None and all(isinstance(dim, int) for dim in shape[1:])
            for dtype, shape in self._inputs.values()
        )
        """Whether any two feeds :meth:`check_feed` took stack: batchable, with every
        type and every size past the first fixed by the release."""
        self.row_ms: float | None = None
        """The model's time per row in its last serving call (ms), None before one ..."""
        self.call_ms = float("inf")
        """... and how long that call took: what decides whether its next inferences run
        inline (see :mod:`agent.inference`)."""

    def took(self, latency_ms: float, rows: int) -> None:
        """A serving call of ``rows`` rows took ``latency_ms``."""
        self.call_ms = latency_ms
        self.row_ms = latency_ms / rows

    def tally(self) -> Tally:
        """An empty tally of this model's inferences."""
        return Tally(self.release_id, self.sha256)

    def _check_io(self) -> None:
        declared = {t.name: t.dtype for t in self.release.inputs}
        actual = {i.name: dtype_name(i.type) for i in self._session.get_inputs()}
        if declared != actual:
            raise ArtifactError(
                Reason.MODEL_LOAD_FAILED, f"model inputs {actual} differ from release {declared}"
            )
        outputs = {o.name: dtype_name(o.type) for o in self._session.get_outputs()}
        for spec in self.release.outputs:
            if outputs.get(spec.name) != spec.dtype:
                raise ArtifactError(
                    Reason.MODEL_LOAD_FAILED,
                    f"model output {spec.name}: {outputs.get(spec.name)} is not {spec.dtype}",
                )

    def _session_run(self, feed: Mapping[str, npt.NDArray[np.generic]]) -> list[object]:
        try:
            outputs: list[object] = self._session.run(self._output_names, dict(feed))
        except Exception as exc:  # any onnxruntime failure is an inference error
            msg = f"inference failed: {exc}"
            raise ValueError(msg) from exc
        return outputs

    def outputs(
        self, feed: Mapping[str, npt.NDArray[np.generic]]
    ) -> dict[str, npt.NDArray[np.generic]]:
        """Every output the release declares, by name, for one feed.

        Raises:
            ValueError: the model failed on this input.
        """
        return self.timed(feed)[0]

    def check_feed(self, feed: Mapping[str, object]) -> int:
        """How many rows ``feed`` holds (1 for a model that does not batch), once it is
        known to fit the release's declared inputs: names, types, ranks, fixed sizes.

        Raises:
            InvalidInputError: saying what does not fit.
        """
        lone = self._lone
        if lone is not None and len(feed) == 1:  # the common case, checked in a few steps
            name, dtype, rank, tail = lone
            array = feed.get(name)
            if type(array) is np.ndarray and array.dtype is dtype:
                shape = array.shape
                if len(shape) == rank and shape[1:] == tail and shape[0] > 0:
                    return int(shape[0])
        return self._check_each(feed)

    def _check_each(self, feed: Mapping[str, object]) -> int:
        """:meth:`check_feed`, input by input, saying what does not fit."""
        if feed.keys() != self._inputs.keys():
            given = ", ".join(sorted(map(str, feed))[:_MAX_NAMES_SHOWN])
            msg = f"inputs [{given}] are not the model's [{', '.join(sorted(self._inputs))}]"
            raise InvalidInputError(bound_text(msg, _TEXT))
        rows: set[int] = set()
        for name, dtype, rank, start, tail, others in self._checks:
            array = feed[name]
            if not isinstance(array, np.ndarray):
                msg = f"input {name}: a numpy array is needed, not {type(array).__name__}"
                raise InvalidInputError(bound_text(msg, _TEXT))
            shape, kind = array.shape, array.dtype
            if (
                len(shape) != rank
                or (kind is not dtype and dtype is not None and kind != dtype)
                or shape[start:] != tail
                or (others and any(shape[axis] != want for axis, want in others))
            ):
                self._misfit(name, array)
            rows.add(shape[0] if shape else 1)
        if not self.batchable:
            return 1
        if len(rows) != 1 or 0 in rows:
            msg = f"inputs disagree on their number of rows ({sorted(rows)[:_MAX_NAMES_SHOWN]})"
            raise InvalidInputError(bound_text(msg, _TEXT))
        return rows.pop()

    def _misfit(self, name: str, array: npt.NDArray[np.generic]) -> NoReturn:
        """Raises: InvalidInputError: what of ``array`` does not fit input ``name``."""
        dtype, shape = self._inputs[name]
        if dtype is not None and array.dtype != dtype:
            msg = f"input {name}: type {array.dtype} where the model takes {dtype}"
        else:
            msg = f"input {name}: shape {list(array.shape)} where the model takes {list(shape)}"
        raise InvalidInputError(bound_text(msg, _TEXT))

    def blank_feed(self) -> Feed:
        """Zeros of the declared inputs, one row: a self-test input for a device that has
        no source of its own and no golden set."""
        feed: Feed = {}
        for name, (dtype, shape) in self._inputs.items():
            sizes = [dim if isinstance(dim, int) else 1 for dim in shape]
            feed[name] = np.zeros(sizes, dtype=dtype or np.float32)
        return feed

    def timed(self, feed: Mapping[str, npt.NDArray[np.generic]]) -> tuple[Outputs, float]:
        """Every declared output for ``feed``, and how long the model took in ms.

        Raises:
            ValueError: the model failed on this input.
        """
        start = time.perf_counter()
        values = self._session_run(feed)
        latency_ms = (time.perf_counter() - start) * 1000.0
        outputs = {
            name: np.asarray(value) for name, value in zip(self._output_names, values, strict=True)
        }
        return outputs, latency_ms

    @staticmethod
    def first_rows(
        outputs: Outputs, starts: npt.NDArray[np.intp]
    ) -> tuple[list[float] | None, list[int] | None]:
        """What telemetry counts of the answers whose first rows are ``starts`` (their
        outputs stacked): each one's confidence (the top value of its first row of the
        first 2-D float output) and label (the first value of its first row of the first
        integer output); None where the outputs have none.

        Raises:
            ValueError: an output holds non-finite values (an inference error).
        """
        confidences: list[float] | None = None
        labels: list[int] | None = None
        for name, array in outputs.items():
            kind = array.dtype.kind
            if kind == "f":
                if not np.isfinite(array).all():
                    msg = f"non-finite values in output {name}"
                    raise ValueError(msg)
                if confidences is None and array.ndim == 2 and array.size:
                    confidences = array[starts].max(axis=1).tolist()
            elif kind in "iu" and labels is None and array.size:
                flat = array.reshape(array.shape[0] if array.ndim else 1, -1)
                labels = flat[starts, 0].tolist()
        return confidences, labels

    @staticmethod
    def summarise(outputs: Outputs, latency_ms: float) -> InferenceResult:
        """What telemetry counts of one answer: its latency, and its first row's
        confidence and label, as :meth:`first_rows` tells them (with scalar numpy calls,
        cheaper for one answer).

        Raises:
            ValueError: an output holds non-finite values (an inference error).
        """
        confidence: float | None = None
        label: int | None = None
        for name, array in outputs.items():
            if array.dtype.kind == "f":
                if not np.isfinite(array).all():
                    msg = f"non-finite values in output {name}"
                    raise ValueError(msg)
                if confidence is None and array.ndim == 2 and array.size:
                    confidence = float(array[0].max())
            elif array.dtype.kind in "iu" and label is None and array.size:
                label = int(array.reshape(-1)[0])
        return InferenceResult(latency_ms=latency_ms, confidence=confidence, label=label)

    def run(self, feed: Feed) -> InferenceResult:
        """Run one inference, blocking (the self-test's; serving goes through
        :class:`agent.inference.Inference`).

        Raises:
            ValueError: the model failed on this input or produced non-finite output;
                the caller counts it as an inference error.
        """
        return self.summarise(*self.timed(feed))

    def self_test(self, check: GoldenSet | Feed) -> None:
        """Prove the model before it takes traffic.

        With a golden set, which must have been made for this very model, every case
        must give its expected outputs (``schemas.golden_mismatches``); without one, a
        run on a real input must succeed.

        Raises:
            ArtifactError: SELF_TEST_FAILED, saying which case and output failed.
        """
        if not isinstance(check, GoldenSet):
            try:
                self.run(check)
            except ValueError as exc:
                raise ArtifactError(Reason.SELF_TEST_FAILED, str(exc)) from exc
            return
        own = self.release.artifact.sha256
        if check.model_sha256 != own:
            raise ArtifactError(
                Reason.SELF_TEST_FAILED,
                f"golden set made for model {check.model_sha256[:12]}, not {own[:12]}",
            )
        cases = iter(range(len(check.cases)))

        def run_case(
            feed: Mapping[str, npt.NDArray[np.generic]],
        ) -> dict[str, npt.NDArray[np.generic]]:
            index = next(cases)  # golden_mismatches runs the cases in order
            try:
                return self.outputs(feed)
            except ValueError as exc:
                raise ArtifactError(Reason.SELF_TEST_FAILED, f"golden case {index}: {exc}") from exc

        problems = golden_mismatches(check, run_case)
        if problems:
            raise ArtifactError(
                Reason.SELF_TEST_FAILED,
                f"golden set ({len(check.cases)} cases) not matched: {'; '.join(problems)}",
            )
