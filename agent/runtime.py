"""Loading and running one model in onnxruntime: a serving slot.

Loading, self-testing and running all block (they are onnxruntime calls), so the
agent calls them from threads. A slot is only built from a file whose sha256 was
verified against a signed manifest, and a golden set is only read from such a file.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

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
        self._output_names = [o.name for o in release.outputs]
        self._inputs = {t.name: (_numpy_dtype(t.dtype), t.shape) for t in release.inputs}
        leading = [t.shape[0] if t.shape else 1 for t in (*release.inputs, *release.outputs)]
        leading += [i.shape[0] if i.shape else 1 for i in self._session.get_inputs()]
        self.batchable = not any(isinstance(dim, int) for dim in leading)
        """Whether feeds may be stacked along the first axis and run as one: every
        declared and actual input, and every declared output, has a free first dimension."""

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
        if feed.keys() != self._inputs.keys():
            given = ", ".join(sorted(map(str, feed))[:_MAX_NAMES_SHOWN])
            msg = f"inputs [{given}] are not the model's [{', '.join(sorted(self._inputs))}]"
            raise InvalidInputError(bound_text(msg, _TEXT))
        rows: set[int] = set()
        for name, (dtype, shape) in self._inputs.items():
            array = feed[name]
            if not isinstance(array, np.ndarray):
                msg = f"input {name}: a numpy array is needed, not {type(array).__name__}"
                raise InvalidInputError(bound_text(msg, _TEXT))
            if dtype is not None and array.dtype != dtype:
                msg = f"input {name}: type {array.dtype} where the model takes {dtype}"
                raise InvalidInputError(bound_text(msg, _TEXT))
            if array.ndim != len(shape) or any(
                isinstance(want, int) and got != want
                for got, want in zip(array.shape, shape, strict=True)
            ):
                msg = f"input {name}: shape {list(array.shape)} where the model takes {list(shape)}"
                raise InvalidInputError(bound_text(msg, _TEXT))
            rows.add(array.shape[0] if array.ndim else 1)
        if not self.batchable:
            return 1
        if len(rows) != 1 or 0 in rows:
            msg = f"inputs disagree on their number of rows ({sorted(rows)[:_MAX_NAMES_SHOWN]})"
            raise InvalidInputError(bound_text(msg, _TEXT))
        return rows.pop()

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
    def summarise(outputs: Outputs, latency_ms: float) -> InferenceResult:
        """What telemetry counts of one answer: its latency, the first row's confidence
        (of the first 2-D float output) and label (of the first integer output).

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
