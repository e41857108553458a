"""Loading and running one model in onnxruntime: a serving slot.

Loading, self-testing and running all block (they are onnxruntime calls), so the
agent calls them from threads. A slot is only built from a file whose sha256 was
verified against a signed manifest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from schemas import ArtifactError, Reason, Release
from schemas.manifest import dtype_name

__all__ = ["Feed", "InferenceResult", "ModelSlot"]

Feed = dict[str, npt.NDArray[np.generic]]


@dataclass(frozen=True, kw_only=True)
class InferenceResult:
    latency_ms: float
    confidence: float | None
    label: int | None


class ModelSlot:
    """One loaded model, ready to serve."""

    def __init__(self, release: Release, path: Path) -> None:
        """Load the model and check it matches the release's declared I/O.

        Raises:
            ArtifactError: MODEL_LOAD_FAILED when onnxruntime refuses the file or its
                inputs/outputs are not those the release declares.
        """
        self.release = release
        available = set(ort.get_available_providers())
        providers = [p for p in release.runtime.providers if p in available]
        if not providers:
            raise ArtifactError(
                Reason.MODEL_LOAD_FAILED,
                f"none of {list(release.runtime.providers)} available here ({sorted(available)})",
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = release.runtime.intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises bare Fail/InvalidGraph/RuntimeError
            raise ArtifactError(Reason.MODEL_LOAD_FAILED, f"onnxruntime: {exc}") from exc
        self._check_io()
        self.providers = tuple(self._session.get_providers())
        self._outputs = [o.name for o in release.outputs]

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

    def run(self, feed: Feed) -> InferenceResult:
        """Run one inference.

        Raises:
            ValueError: the model failed on this input or produced non-finite output;
                the caller counts it as an inference error.
        """
        start = time.perf_counter()
        try:
            outputs = self._session.run(self._outputs, feed)
        except Exception as exc:  # any onnxruntime failure is an inference error
            msg = f"inference failed: {exc}"
            raise ValueError(msg) from exc
        latency_ms = (time.perf_counter() - start) * 1000.0
        confidence: float | None = None
        label: int | None = None
        for spec, value in zip(self.release.outputs, outputs, strict=True):
            array = np.asarray(value)
            if array.dtype.kind == "f":
                if not np.all(np.isfinite(array)):
                    msg = f"non-finite values in output {spec.name}"
                    raise ValueError(msg)
                if confidence is None and array.ndim == 2:
                    confidence = float(array[0].max())
            elif array.dtype.kind in "iu" and label is None and array.size:
                label = int(array.reshape(-1)[0])
        return InferenceResult(latency_ms=latency_ms, confidence=confidence, label=label)

    def self_test(self, feed: Feed) -> None:
        """Run once on a real input before taking traffic.

        Raises:
            ArtifactError: SELF_TEST_FAILED.
        """
        try:
            self.run(feed)
        except ValueError as exc:
            raise ArtifactError(Reason.SELF_TEST_FAILED, str(exc)) from exc
