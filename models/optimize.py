"""Builds of one model per precision, measured and written as a release bundle.

:func:`build_variants` makes, from one fp32 ONNX model:

* ``fp32``: the original bytes, unchanged;
* ``fp16``: every float weight and operation in float16, inputs and outputs kept float32
  (``onnxruntime.transformers.float16``), for GPU classes;
* ``int8-static``: weights and activations of every ``MatMul``/``Gemm`` in int8 with
  scales fixed from calibration rows (QDQ format): after onnxruntime's pre-processing
  (``MatMul+Add`` fused into ``Gemm``), activations uint8, weights int8 per tensor with
  ``reduce_range`` (7-bit weights). On AVX2 CPUs without VNNI, full 8-bit uint8 x int8
  products can saturate 16-bit accumulators: outputs then drift from the QDQ reference by
  up to 0.2 in probability and differ between CPU generations. With 7-bit weights this
  CPU computes exactly the reference, so golden vectors hold on other hardware too.
  Per-channel scales gave no better accuracy on the demo models and were slower.
  Softmax and ArgMax stay float, so probabilities are not quantised.
* ``int8-dynamic``: int8 weights, activations quantised at run time per call (no
  calibration), for CPUs whose classes allow it.

:func:`optimize` builds them, measures each on held-out data (size, single-sample p50/p95
latency on this machine, accuracy), makes golden vectors (:mod:`models.golden`) and writes
``<name>.<label>.onnx``, ``<name>.<label>.golden`` and ``bundle.json`` into a folder;
:func:`read_bundle` reads such a folder back, checking every file's sha256.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
import warnings
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.transformers.float16 import convert_float_to_float16

from models.bundle import (
    BUNDLE_FILENAME,
    BundleSource,
    BundleVariant,
    ReleaseBundle,
    format_bundle,
    read_bundle,
    sha256_hex,
    write_bundle,
)
from models.datafile import DataSet
from models.evaluate import Classifier
from models.golden import make_golden
from models.precision import PRECISIONS, Precision, detect_precision
from schemas import UsageError, encode
from schemas.topics import NAME_PATTERN
from storage import atomic_write

__all__ = [
    "BUNDLE_FILENAME",
    "LABELS",
    "LATENCY_RUNS",
    "BundleVariant",
    "ReleaseBundle",
    "VariantBuild",
    "build_variants",
    "format_bundle",
    "optimize",
    "read_bundle",
]

logger = logging.getLogger(__name__)

LATENCY_RUNS: Final = 300
"""Single-sample runs per variant for p50/p95 (after warm-up), cycling over held-out rows."""
LABELS: Final[dict[Precision, str]] = {
    "fp32": "fp32",
    "fp16": "fp16",
    "int8": "int8-static",
    "int8-dynamic": "int8-dynamic",
}
_QUANTIZED_OPS: Final = ["MatMul", "Gemm"]
_CALIBRATION_BATCH: Final = 64
_QUANTIZER_PATH = re.compile(r"onnxruntime[/\\](quantization|transformers)[/\\]")


@dataclass(frozen=True, eq=False)
class VariantBuild:
    """One build of a model: its label (``fp32``, ``fp16``, ``int8-static``,
    ``int8-dynamic``), precision and serialized ONNX bytes."""

    label: str
    precision: Precision
    data: bytes


def build_variants(
    model: bytes, calibration: DataSet, *, precisions: Collection[Precision]
) -> list[VariantBuild]:
    """Build ``model`` in each of ``precisions`` (in :data:`PRECISIONS` order), blocking.

    Every build keeps the model's input and output names and types. ``calibration``
    rows set the int8-static activation scales; they should be real inputs.

    Raises:
        ValueError: an unknown or no precision; the model does not load in onnxruntime or
            is no single-input classifier; the calibration rows do not fit its input; or a
            build fails or changes the model's inputs or outputs.
    """
    unknown = set(precisions) - set(PRECISIONS)
    if unknown or not precisions:
        raise ValueError(f"precisions must be some of {PRECISIONS}, got {sorted(precisions)}")
    original, feeds = _check_model(model, calibration)
    builds = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-variants-") as tmp, _quiet():
        folder = Path(tmp)
        prepared: Path | None = None
        for precision in (p for p in PRECISIONS if p in precisions):
            label = LABELS[precision]
            try:
                if precision == "fp32":
                    data = model
                elif precision == "fp16":
                    data = _fp16(model)
                else:
                    if prepared is None:
                        prepared = _prepare(model, folder)
                    data = _int8(prepared, folder, label, _Rows(feeds))
            except Exception as exc:  # the quantisation tools raise a zoo of types
                raise ValueError(f"the {label} build failed: {exc}") from exc
            if precision != "fp32":
                data = _tagged(data, label, model)
            _check_build(original, data, label, precision)
            builds.append(VariantBuild(label=label, precision=precision, data=data))
    return builds


def optimize(
    model_path: Path,
    calibration: DataSet,
    holdout: DataSet,
    *,
    precisions: Collection[Precision],
    out_dir: Path,
    name: str | None = None,
    threads: int = 1,
) -> ReleaseBundle:
    """Build, measure and write the variants of the model at ``model_path`` (blocking).

    Each variant is scored on ``holdout`` (accuracy; single-sample latency with ``threads``
    intra-op threads over :data:`LATENCY_RUNS` runs) and gets golden vectors from its
    held-out rows. Writes ``<name>.<label>.onnx``, ``<name>.<label>.golden`` and
    ``bundle.json`` into ``out_dir``, each atomically.

    Raises:
        UsageError: ``model_path`` cannot be read, or ``name`` is not a valid release name.
        ValueError: as :func:`build_variants`; or ``holdout`` has no labels or does not fit.
    """
    name = name or model_path.stem
    if not re.fullmatch(NAME_PATTERN, name):
        raise UsageError(f"{name!r} is not a release name (letters, digits, '.', '_', '-')")
    if holdout.y is None:
        raise ValueError(f"{holdout.source} has no labels: accuracy needs held-out labels")
    try:
        model = model_path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read model {model_path}: {exc}") from exc
    Classifier(model).check_fits(holdout.x, what=f"held-out data {holdout.source}")
    builds = build_variants(model, calibration, precisions=precisions)
    out_dir.mkdir(parents=True, exist_ok=True)
    variants = []
    for build in builds:
        classifier = Classifier(build.data, intra_op_threads=threads)
        accuracy = classifier.accuracy(holdout.x, holdout.y)
        p50, p95 = classifier.latency_ms(holdout.x, runs=LATENCY_RUNS)
        golden = encode(
            make_golden(build.data, holdout.x, precision=build.precision, source=holdout.source)
        )
        file = out_dir / f"{name}.{build.label}.onnx"
        golden_file = out_dir / f"{name}.{build.label}.golden"
        atomic_write(file, build.data)
        atomic_write(golden_file, golden)
        variants.append(
            BundleVariant(
                label=build.label,
                precision=build.precision,
                file=file,
                golden=golden_file,
                sha256=sha256_hex(build.data),
                size=len(build.data),
                golden_sha256=sha256_hex(golden),
                golden_size=len(golden),
                accuracy=accuracy,
                p50_ms=p50,
                p95_ms=p95,
            )
        )
    bundle = ReleaseBundle(name=name, variants=tuple(variants))
    write_bundle(
        out_dir,
        bundle,
        BundleSource(
            model_path.name, sha256_hex(model), len(model), calibration.source, holdout.source
        ),
        holdout_samples=len(holdout.x),
        threads=threads,
    )
    return bundle


# --- building -------------------------------------------------------------------------


def _check_model(
    model: bytes, calibration: DataSet
) -> tuple[onnx.ModelProto, list[dict[str, npt.NDArray[np.float32]]]]:
    """The model and its calibration feeds.

    Raises:
        ValueError: see :func:`build_variants`.
    """
    try:
        proto = onnx.load_from_string(model)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ValueError(f"not an ONNX model: {exc}") from exc
    classifier = Classifier(model)
    if (precision := detect_precision(proto)) != "fp32":
        raise ValueError(f"variants are built from an fp32 model, this one computes in {precision}")
    classifier.check_fits(calibration.x, what=f"calibration data {calibration.source}")
    feeds = _batches(classifier, calibration.x)
    try:
        classifier.session.run(None, feeds[0])
    except Exception as exc:  # onnxruntime's own error types
        raise ValueError(f"the model fails on calibration rows: {exc}") from exc
    return proto, feeds


def _fp16(model: bytes) -> bytes:
    converted = convert_float_to_float16(onnx.load_from_string(model), keep_io_types=True)
    return _serialize(converted)


def _prepare(model: bytes, folder: Path) -> Path:
    """onnxruntime's pre-processing (shape inference, MatMul+Add -> Gemm): quantisation
    then sees one op per layer and writes integer biases."""
    source = folder / "model.onnx"
    source.write_bytes(model)
    prepared = folder / "prepared.onnx"
    quant_pre_process(source, prepared, skip_symbolic_shape=True)
    return prepared


def _int8(prepared: Path, folder: Path, label: str, rows: _Rows) -> bytes:
    out = folder / f"{label}.onnx"
    if label == "int8-static":
        quantize_static(
            prepared,
            out,
            rows,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=_QUANTIZED_OPS,
            per_channel=False,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    else:
        quantize_dynamic(
            prepared, out, op_types_to_quantize=_QUANTIZED_OPS, weight_type=QuantType.QInt8
        )
    return out.read_bytes()


def _batches(
    classifier: Classifier, x: npt.NDArray[np.float32]
) -> list[dict[str, npt.NDArray[np.float32]]]:
    """Calibration rows as feeds of up to :data:`_CALIBRATION_BATCH` rows."""
    name = classifier.input_name
    return [
        {name: np.ascontiguousarray(x[i : i + _CALIBRATION_BATCH])}
        for i in range(0, len(x), _CALIBRATION_BATCH)
    ]


class _Rows(CalibrationDataReader):  # type: ignore[misc]  # untyped base class
    """Hands the quantiser one calibration feed at a time."""

    def __init__(self, feeds: list[dict[str, npt.NDArray[np.float32]]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, npt.NDArray[np.float32]] | None:
        return next(self._feeds, None)


def _initializers(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer}


def _tagged(data: bytes, label: str, source: bytes) -> bytes:
    """``data`` with the variant label and the source model's sha256 in its metadata."""
    proto = onnx.load_from_string(data)
    # The source's measured accuracy is not this build's: optimize measures each build.
    stale = {"holdout_accuracy", "holdout_samples"}
    props = {p.key: p.value for p in proto.metadata_props if p.key not in stale}
    props.update({"variant": label, "variant_of": sha256_hex(source)})
    onnx.helper.set_model_props(proto, dict(sorted(props.items())))
    return _serialize(proto)


def _check_build(original: onnx.ModelProto, data: bytes, label: str, precision: Precision) -> None:
    built = onnx.load_from_string(data)
    for kind, want, got in (
        (
            "inputs",
            _signature(original.graph.input, original),
            _signature(built.graph.input, built),
        ),
        ("outputs", _signature(original.graph.output), _signature(built.graph.output)),
    ):
        if want != got:
            raise ValueError(f"the {label} build changed the model's {kind}: {want} -> {got}")
    detected = detect_precision(built)
    if detected != precision:
        raise ValueError(f"the {label} build computes in {detected}, not {precision}")


def _signature(
    values: Collection[onnx.ValueInfoProto], model: onnx.ModelProto | None = None
) -> list[tuple[str, int]]:
    skip = _initializers(model) if model is not None else set()
    return [(v.name, v.type.tensor_type.elem_type) for v in values if v.name not in skip]


def _serialize(model: onnx.ModelProto) -> bytes:
    data: bytes = model.SerializeToString(deterministic=True)
    return data


class _QuantizerLog(logging.Filter):
    """Takes onnxruntime's quantisation messages off the root logger, re-logged at debug."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _QUANTIZER_PATH.search(record.pathname):
            logger.debug("onnxruntime: %s", record.getMessage())
            return False
        return True


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Route the quantisation tools' root-logger messages and Python warnings to debug logs.

    They log to the root logger, and warn, about things that concern their own authors
    (pre-processing advice, unspecified parameters of unquantised tensors). Python's
    warning filters are process-wide: while a build runs, other threads' warnings are
    routed to the debug log too.
    """
    root = logging.getLogger()
    noise = _QuantizerLog()
    root.addFilter(noise)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        root.removeFilter(noise)
    for warning in caught:
        logger.debug("onnxruntime warned: %s", warning.message)
