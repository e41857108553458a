"""The three demo models, trained on real digits data and cached as ONNX files.

``build_demo_models(out_dir)`` trains (a few seconds), exports and writes:

* ``digits-v1.onnx``: multinomial logistic regression, ``MatMul+Add+Softmax+ArgMax``.
* ``digits-v2.onnx``: a 64-128-10 ReLU MLP, more accurate than v1.
* ``digits-v2-slow.onnx``: a *bad build* of v2 for exercising health checks. It is the v2
  network plus a weight-tied refinement block unrolled 320 times (one shared 1024x1024
  matrix, seeded pseudo-random, untrained) whose output nudges the logits by a few
  hundredths. Accuracy stays that of v2 while single-sample latency grows to tens of ms
  (v1/v2 run in well under 1 ms). See :class:`models.export.SlowRefinement`.

Files are written atomically (temp file, fsync, ``os.replace``). ``index.json`` beside them
records each file's build recipe and sha256; a later call whose recipe matches and whose
file is intact reuses it without training.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import sklearn

from models.datasets import HOLDOUT_FRACTION, PIXEL_MAX, DigitsSplit, load_digits_split
from models.evaluate import measure_accuracy, open_session, session_accuracy
from models.export import (
    EXPORTER_VERSION,
    INPUT_NAME,
    INPUT_SHAPE,
    IR_VERSION,
    OPSET,
    OUTPUT_NAMES,
    SlowRefinement,
    export_classifier,
    export_slow_classifier,
    serialize,
    set_metadata,
)
from models.train import (
    DenseLayer,
    LogRegRecipe,
    MLPRecipe,
    TrainedClassifier,
    recipe_dict,
    train_logreg,
    train_mlp,
)
from storage import atomic_write

__all__ = [
    "DEMO_MODEL_NAMES",
    "INDEX_FILENAME",
    "DemoModel",
    "build_demo_models",
    "measure_accuracy",
]

logger = logging.getLogger(__name__)

INDEX_FILENAME = "index.json"
_INDEX_SCHEMA = 1
DEMO_MODEL_NAMES: tuple[str, ...] = ("digits-v1", "digits-v2", "digits-v2-slow")
_SPLIT_SEED = 0
_LOGREG = LogRegRecipe()
_MLP = MLPRecipe()
_SLOW = SlowRefinement()


@dataclass(frozen=True)
class DemoModel:
    """A built demo model file and what devices need to know to run it."""

    name: str
    path: Path
    sha256: str
    size: int
    holdout_accuracy: float
    input_name: str
    input_shape: tuple[int | str, ...]
    output_names: tuple[str, ...]


@dataclass(frozen=True)
class _Spec:
    name: str
    version: str
    description: str
    recipe: dict[str, Any]


def _specs() -> dict[str, _Spec]:
    common: dict[str, Any] = {
        "dataset": "sklearn.datasets.load_digits",
        "scaling": f"pixels / {PIXEL_MAX:g}",
        "split": {"seed": _SPLIT_SEED, "holdout_fraction": HOLDOUT_FRACTION, "stratified": True},
        "export": {"exporter": EXPORTER_VERSION, "opset": OPSET, "ir_version": IR_VERSION},
        "libraries": {"scikit-learn": sklearn.__version__, "numpy": np.__version__},
    }
    specs = [
        _Spec(
            "digits-v1",
            "1.0.0",
            "Multinomial logistic regression on 8x8 digits (MatMul+Add+Softmax+ArgMax).",
            {**common, "trainer": recipe_dict(_LOGREG)},
        ),
        _Spec(
            "digits-v2",
            "2.0.0",
            f"One-hidden-layer MLP ({_MLP.hidden_units} ReLU units) on 8x8 digits.",
            {**common, "trainer": recipe_dict(_MLP)},
        ),
        _Spec(
            "digits-v2-slow",
            "2.0.1",
            "BAD BUILD for health-check demos: digits-v2 plus an untrained, weight-tied "
            f"refinement block ({_SLOW.width}x{_SLOW.width} matrix unrolled {_SLOW.steps} "
            "times) that barely changes predictions but makes single-sample inference hundreds of "
            "times slower (tens of ms instead of well under 1 ms).",
            {**common, "trainer": recipe_dict(_MLP), "refinement": _SLOW.as_dict()},
        ),
    ]
    # Metadata is part of the file: a changed version or description also invalidates it.
    return {
        s.name: _Spec(
            s.name,
            s.version,
            s.description,
            {**s.recipe, "release": {"version": s.version, "description": s.description}},
        )
        for s in specs
    }


def build_demo_models(out_dir: Path) -> dict[str, DemoModel]:
    """Train, export and write the demo models into ``out_dir``; reuse intact up-to-date files.

    Returns the models keyed by name (``digits-v1``, ``digits-v2``, ``digits-v2-slow``).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    index = _read_index(out_dir / INDEX_FILENAME)
    specs = _specs()
    result: dict[str, DemoModel] = {}
    for name, spec in specs.items():
        reused = _reuse(out_dir, index.get(name), spec)
        if reused is not None:
            result[name] = reused
    missing = [name for name in specs if name not in result]
    if not missing:
        return result

    split = load_digits_split(_SPLIT_SEED)
    trained: dict[str, TrainedClassifier] = {}

    def classifier(
        kind: str, train: Callable[[DigitsSplit], TrainedClassifier]
    ) -> tuple[DenseLayer, ...]:
        if kind not in trained:
            trained[kind] = train(split)
        return trained[kind].layers

    for name in missing:
        spec = specs[name]
        logger.info("building demo model %s in %s", name, out_dir)
        if name == "digits-v1":
            model = export_classifier(
                classifier("logreg", train_logreg), graph_name=name, doc_string=spec.description
            )
        elif name == "digits-v2":
            model = export_classifier(
                classifier("mlp", train_mlp), graph_name=name, doc_string=spec.description
            )
        else:
            model = export_slow_classifier(
                classifier("mlp", train_mlp),
                _SLOW,
                graph_name=name,
                doc_string=spec.description,
            )
        result[name] = _write_model(out_dir, spec, model, split)

    _write_index(out_dir, {name: _index_entry(m, specs[name]) for name, m in result.items()})
    return {name: result[name] for name in specs}


def _write_model(
    out_dir: Path, spec: _Spec, model: onnx.ModelProto, split: DigitsSplit
) -> DemoModel:
    accuracy = session_accuracy(open_session(serialize(model)), split.x_holdout, split.y_holdout)
    set_metadata(
        model,
        {
            "name": spec.name,
            "version": spec.version,
            "description": spec.description,
            "training_data": (
                f"sklearn.datasets.load_digits (scikit-learn {sklearn.__version__}), "
                f"stratified split seed={split.seed}: {len(split.y_train)} train / "
                f"{len(split.y_holdout)} held-out samples; input = pixels / {PIXEL_MAX:g}"
            ),
            "holdout_accuracy": f"{accuracy:.6f}",
            "holdout_samples": str(len(split.y_holdout)),
            "recipe": json.dumps(spec.recipe, sort_keys=True),
        },
    )
    data = serialize(model)
    path = out_dir / f"{spec.name}.onnx"
    atomic_write(path, data)
    return DemoModel(
        name=spec.name,
        path=path,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        holdout_accuracy=accuracy,
        input_name=INPUT_NAME,
        input_shape=INPUT_SHAPE,
        output_names=OUTPUT_NAMES,
    )


def _reuse(out_dir: Path, entry: Any, spec: _Spec) -> DemoModel | None:
    if not isinstance(entry, dict):
        return None
    try:
        if _canonical(entry["recipe"]) != _canonical(spec.recipe):
            return None
        path = out_dir / str(entry["file"])
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if sha != entry["sha256"] or len(data) != entry["size"]:
            logger.warning("demo model %s does not match its index entry; rebuilding", path)
            return None
        return DemoModel(
            name=spec.name,
            path=path,
            sha256=sha,
            size=len(data),
            holdout_accuracy=float(entry["holdout_accuracy"]),
            input_name=str(entry["input_name"]),
            input_shape=tuple(entry["input_shape"]),
            output_names=tuple(str(n) for n in entry["output_names"]),
        )
    except (KeyError, TypeError, ValueError, OSError):
        return None


def _index_entry(model: DemoModel, spec: _Spec) -> dict[str, Any]:
    return {
        "file": model.path.name,
        "recipe": spec.recipe,
        "sha256": model.sha256,
        "size": model.size,
        "holdout_accuracy": model.holdout_accuracy,
        "input_name": model.input_name,
        "input_shape": list(model.input_shape),
        "output_names": list(model.output_names),
    }


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _read_index(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict) or raw.get("schema") != _INDEX_SCHEMA:
        return {}
    models = raw.get("models")
    return models if isinstance(models, dict) else {}


def _write_index(out_dir: Path, entries: dict[str, Any]) -> None:
    text = json.dumps({"schema": _INDEX_SCHEMA, "models": entries}, indent=2, sort_keys=True)
    atomic_write(out_dir / INDEX_FILENAME, (text + "\n").encode("utf-8"))
