"""The demo models, trained on real bundled data and cached as ONNX files, with their data.

``build_demo_models(out_dir)`` trains (seconds), exports and writes:

* ``digits-v1.onnx``: multinomial logistic regression, ``MatMul+Add+Softmax+ArgMax``.
* ``digits-v2.onnx``: a 64-128-10 ReLU MLP, more accurate than v1.
* ``digits-v2-slow.onnx``: a *bad build* of v2 for exercising health checks. It is the v2
  network plus a weight-tied refinement block unrolled 320 times (one shared 1024x1024
  matrix, seeded pseudo-random, untrained) whose output nudges the logits by a few
  hundredths. Accuracy stays that of v2 while single-sample latency grows to tens of ms
  (v1/v2 run in well under 1 ms). See :class:`models.export.SlowRefinement`.
* ``digits-v3.onnx``: a wide 64-1024-1024-10 ReLU MLP (1.1 M weights, 4.4 MB), the model
  worth optimising per hardware class: weights dominate its size and matrix products its
  latency, so INT8 builds are about 4x smaller and markedly faster.
* ``cytology-v1.onnx``: a 30-64-2 ReLU MLP on raw cytology measurements of fine-needle
  aspirates (the breast cancer data),
  standardising its inputs in the graph.

and one data set file per task (:mod:`models.datafile`), ``digits.npz`` and ``cytology.npz``:
``calibration_x`` = the first :data:`CALIBRATION_ROWS` rows of the training split, and
``holdout_x``/``holdout_y`` = the held-out split every model's accuracy is measured on.

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
from typing import Any, Literal

import numpy as np
import onnx
import sklearn

from models.datafile import save_dataset
from models.datasets import (
    HOLDOUT_FRACTION,
    PIXEL_MAX,
    Split,
    load_cytology_split,
    load_digits_split,
)
from models.evaluate import measure_accuracy, open_session, session_accuracy
from models.export import (
    CYTOLOGY_INPUT_NAME,
    CYTOLOGY_INPUT_SHAPE,
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
    DeepMLPRecipe,
    LogRegRecipe,
    MLPRecipe,
    TrainedClassifier,
    recipe_dict,
    train_deep_mlp,
    train_logreg,
    train_mlp,
)
from storage import atomic_write

__all__ = [
    "CALIBRATION_ROWS",
    "CYTOLOGY_V1_RECIPE",
    "DEMO_MODEL_NAMES",
    "DIGITS_V3_RECIPE",
    "INDEX_FILENAME",
    "TASKS",
    "DemoModel",
    "Task",
    "build_demo_models",
    "measure_accuracy",
]

logger = logging.getLogger(__name__)

Task = Literal["digits", "cytology"]
TASKS: tuple[Task, ...] = ("digits", "cytology")
INDEX_FILENAME = "index.json"
_INDEX_SCHEMA = 1
DEMO_MODEL_NAMES: tuple[str, ...] = (
    "digits-v1",
    "digits-v2",
    "digits-v2-slow",
    "digits-v3",
    "cytology-v1",
)
CALIBRATION_ROWS = 256
"""Rows of the training split stored as calibration data (quantisation sees no held-out row)."""
_DATA_FORMAT = 1
_SPLIT_SEED = 0
_LOGREG = LogRegRecipe()
_MLP = MLPRecipe()
_SLOW = SlowRefinement()
DIGITS_V3_RECIPE = DeepMLPRecipe(hidden_layers=(1024, 1024), epochs=12, batch_size=128)
CYTOLOGY_V1_RECIPE = DeepMLPRecipe(
    hidden_layers=(64,), epochs=30, batch_size=32, alpha=1e-3, standardize=True
)


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
    task: Task
    dataset: Path
    """The task's data set file (calibration and held-out splits), beside the model."""


@dataclass(frozen=True)
class _Spec:
    name: str
    task: Task
    version: str
    description: str
    recipe: dict[str, Any]


@dataclass(frozen=True)
class _TaskInfo:
    load: Callable[[int], Split]
    input_name: str
    input_shape: tuple[int | str, ...]
    recipe: dict[str, Any]
    """How the data is made: part of every recipe of the task's models and data file."""

    def training_data(self, split: Split) -> str:
        return (
            f"{self.recipe['dataset']} (scikit-learn {sklearn.__version__}), "
            f"stratified split seed={split.seed}: {len(split.y_train)} train / "
            f"{len(split.y_holdout)} held-out samples; input = {self.recipe['scaling']}"
        )


def _split_recipe() -> dict[str, Any]:
    return {"seed": _SPLIT_SEED, "holdout_fraction": HOLDOUT_FRACTION, "stratified": True}


_TASKS: dict[Task, _TaskInfo] = {
    "digits": _TaskInfo(
        load=load_digits_split,
        input_name=INPUT_NAME,
        input_shape=INPUT_SHAPE,
        recipe={
            "dataset": "sklearn.datasets.load_digits",
            "scaling": f"pixels / {PIXEL_MAX:g}",
            "split": _split_recipe(),
        },
    ),
    "cytology": _TaskInfo(
        load=load_cytology_split,
        input_name=CYTOLOGY_INPUT_NAME,
        input_shape=CYTOLOGY_INPUT_SHAPE,
        recipe={
            "dataset": "sklearn.datasets.load_breast_cancer",
            "scaling": "raw features (standardised inside the graph)",
            "split": _split_recipe(),
        },
    ),
}


def _specs() -> dict[str, _Spec]:
    libraries = {"scikit-learn": sklearn.__version__, "numpy": np.__version__}
    export = {"exporter": EXPORTER_VERSION, "opset": OPSET, "ir_version": IR_VERSION}
    common = {
        task: {**info.recipe, "export": export, "libraries": libraries}
        for task, info in _TASKS.items()
    }
    specs = [
        _Spec(
            "digits-v1",
            "digits",
            "1.0.0",
            "Multinomial logistic regression on 8x8 digits (MatMul+Add+Softmax+ArgMax).",
            {**common["digits"], "trainer": recipe_dict(_LOGREG)},
        ),
        _Spec(
            "digits-v2",
            "digits",
            "2.0.0",
            f"One-hidden-layer MLP ({_MLP.hidden_units} ReLU units) on 8x8 digits.",
            {**common["digits"], "trainer": recipe_dict(_MLP)},
        ),
        _Spec(
            "digits-v2-slow",
            "digits",
            "2.0.1",
            "BAD BUILD for health-check demos: digits-v2 plus an untrained, weight-tied "
            f"refinement block ({_SLOW.width}x{_SLOW.width} matrix unrolled {_SLOW.steps} "
            "times) that barely changes predictions but makes single-sample inference hundreds of "
            "times slower (tens of ms instead of well under 1 ms).",
            {**common["digits"], "trainer": recipe_dict(_MLP), "refinement": _SLOW.as_dict()},
        ),
        _Spec(
            "digits-v3",
            "digits",
            "3.0.0",
            f"Wide MLP ({_widths(DIGITS_V3_RECIPE)} ReLU units) on 8x8 digits: weights "
            "dominate its size and matrix products its latency, the model to build per "
            "hardware class in fp16 and int8.",
            {**common["digits"], "trainer": recipe_dict(DIGITS_V3_RECIPE)},
        ),
        _Spec(
            "cytology-v1",
            "cytology",
            "1.0.0",
            f"MLP ({_widths(CYTOLOGY_V1_RECIPE)} ReLU units) on 30 raw cytology measurements "
            "(fine-needle aspirates, breast cancer data), standardised inside the graph; "
            "label 0 = malignant, 1 = benign.",
            {**common["cytology"], "trainer": recipe_dict(CYTOLOGY_V1_RECIPE)},
        ),
    ]
    # Metadata is part of the file: a changed version or description also invalidates it.
    return {
        s.name: _Spec(
            s.name,
            s.task,
            s.version,
            s.description,
            {**s.recipe, "release": {"version": s.version, "description": s.description}},
        )
        for s in specs
    }


def _widths(recipe: DeepMLPRecipe) -> str:
    return "-".join(str(w) for w in recipe.hidden_layers)


def _dataset_recipe(task: Task) -> dict[str, Any]:
    return {
        **_TASKS[task].recipe,
        "format": _DATA_FORMAT,
        "calibration_rows": CALIBRATION_ROWS,
        "libraries": {"scikit-learn": sklearn.__version__, "numpy": np.__version__},
    }


class _Trainer:
    """Loads each task's split and trains each recipe at most once per build."""

    def __init__(self) -> None:
        self._splits: dict[Task, Split] = {}
        self._trained: dict[str, TrainedClassifier] = {}

    def split(self, task: Task) -> Split:
        if task not in self._splits:
            self._splits[task] = _TASKS[task].load(_SPLIT_SEED)
        return self._splits[task]

    def trained(
        self, kind: str, task: Task, train: Callable[[Split], TrainedClassifier]
    ) -> TrainedClassifier:
        if kind not in self._trained:
            self._trained[kind] = train(self.split(task))
        return self._trained[kind]

    def export(self, spec: _Spec) -> onnx.ModelProto:
        name, doc = spec.name, spec.description
        if name == "digits-v1":
            logreg = self.trained("logreg", "digits", train_logreg)
            return export_classifier(logreg.layers, graph_name=name, doc_string=doc)
        if name == "digits-v2":
            mlp = self.trained("mlp", "digits", train_mlp)
            return export_classifier(mlp.layers, graph_name=name, doc_string=doc)
        if name == "digits-v2-slow":
            mlp = self.trained("mlp", "digits", train_mlp)
            return export_slow_classifier(mlp.layers, _SLOW, graph_name=name, doc_string=doc)
        if name == "digits-v3":
            wide = self.trained("wide", "digits", lambda s: train_deep_mlp(s, DIGITS_V3_RECIPE))
            return export_classifier(wide.layers, graph_name=name, doc_string=doc)
        if name == "cytology-v1":
            cytology = self.trained(
                "cytology", "cytology", lambda s: train_deep_mlp(s, CYTOLOGY_V1_RECIPE)
            )
            return export_classifier(
                cytology.layers,
                graph_name=name,
                doc_string=doc,
                input_name=CYTOLOGY_INPUT_NAME,
                standardizer=cytology.standardizer,
            )
        raise ValueError(f"no demo model named {name!r}")


def build_demo_models(out_dir: Path) -> dict[str, DemoModel]:
    """Train, export and write the demo models and their data set files into ``out_dir``;
    reuse intact up-to-date files.

    Returns the models keyed by name, in :data:`DEMO_MODEL_NAMES` order.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model_index, data_index = _read_index(out_dir / INDEX_FILENAME)
    trainer = _Trainer()
    changed = False

    data_entries: dict[str, Any] = {}
    for task in TASKS:
        recipe = _dataset_recipe(task)
        entry = data_index.get(task)
        if not _intact(out_dir, entry, recipe):
            _write_dataset(out_dir / f"{task}.npz", trainer.split(task))
            entry = _file_entry(out_dir / f"{task}.npz", recipe)
            changed = True
        data_entries[task] = entry

    specs = _specs()
    result: dict[str, DemoModel] = {}
    for name, spec in specs.items():
        reused = _reuse(out_dir, model_index.get(name), spec)
        if reused is None:
            logger.info("building demo model %s in %s", name, out_dir)
            reused = _write_model(out_dir, spec, trainer.export(spec), trainer.split(spec.task))
            changed = True
        result[name] = reused
    if changed:
        _write_index(
            out_dir,
            {name: _index_entry(m, specs[name]) for name, m in result.items()},
            data_entries,
        )
    return result


def _write_dataset(path: Path, split: Split) -> None:
    save_dataset(
        path,
        calibration=split.x_train[:CALIBRATION_ROWS],
        holdout=(split.x_holdout, split.y_holdout),
    )


def _write_model(out_dir: Path, spec: _Spec, model: onnx.ModelProto, split: Split) -> DemoModel:
    info = _TASKS[spec.task]
    accuracy = session_accuracy(open_session(serialize(model)), split.x_holdout, split.y_holdout)
    set_metadata(
        model,
        {
            "name": spec.name,
            "version": spec.version,
            "description": spec.description,
            "training_data": info.training_data(split),
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
        input_name=info.input_name,
        input_shape=info.input_shape,
        output_names=OUTPUT_NAMES,
        task=spec.task,
        dataset=out_dir / f"{spec.task}.npz",
    )


def _intact(out_dir: Path, entry: Any, recipe: dict[str, Any]) -> bool:
    """Whether ``entry`` has ``recipe`` and names a file whose bytes it describes."""
    if not isinstance(entry, dict):
        return False
    try:
        if _canonical(entry["recipe"]) != _canonical(recipe):
            return False
        path = out_dir / str(entry["file"])
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"] or len(data) != entry["size"]:
            logger.warning("%s does not match its index entry; rebuilding", path)
            return False
    except (KeyError, TypeError, OSError):
        return False
    return True


def _file_entry(path: Path, recipe: dict[str, Any]) -> dict[str, Any]:
    data = path.read_bytes()
    return {
        "file": path.name,
        "recipe": recipe,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }


def _reuse(out_dir: Path, entry: Any, spec: _Spec) -> DemoModel | None:
    if not _intact(out_dir, entry, spec.recipe):
        return None
    try:
        return DemoModel(
            name=spec.name,
            path=out_dir / str(entry["file"]),
            sha256=str(entry["sha256"]),
            size=int(entry["size"]),
            holdout_accuracy=float(entry["holdout_accuracy"]),
            input_name=str(entry["input_name"]),
            input_shape=tuple(entry["input_shape"]),
            output_names=tuple(str(n) for n in entry["output_names"]),
            task=spec.task,
            dataset=out_dir / f"{spec.task}.npz",
        )
    except (KeyError, TypeError, ValueError):
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


def _read_index(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(models, datasets)`` entries of the index; empty ones when it is missing or stale."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}, {}
    if not isinstance(raw, dict) or raw.get("schema") != _INDEX_SCHEMA:
        return {}, {}
    models, datasets = raw.get("models"), raw.get("datasets")
    return (
        models if isinstance(models, dict) else {},
        datasets if isinstance(datasets, dict) else {},
    )


def _write_index(out_dir: Path, models: dict[str, Any], datasets: dict[str, Any]) -> None:
    text = json.dumps(
        {"schema": _INDEX_SCHEMA, "models": models, "datasets": datasets},
        indent=2,
        sort_keys=True,
    )
    atomic_write(out_dir / INDEX_FILENAME, (text + "\n").encode("utf-8"))
