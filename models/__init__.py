"""Models for edgefleet: real classifiers trained on bundled data, exported to ONNX, built
per precision for hardware classes, and judged on real held-out data before devices run them.

* :mod:`models.zoo`: the demo models and their data set files;
* :mod:`models.datafile`: data set files (calibration and held-out splits);
* :mod:`models.optimize`: fp16/int8 builds of a model, measured and written as a bundle;
* :mod:`models.precision`: which precision a model build computes in;
* :mod:`models.golden`: golden self-test vectors for one build;
* :mod:`models.gate`: the accuracy gate a candidate build must pass.

``models.optimize.optimize`` is not re-exported here: the name would hide its module.
"""

from models.datafile import DataSet, load_dataset, save_dataset
from models.datasets import (
    CytologySplit,
    DigitsSplit,
    DigitsStream,
    Split,
    load_cytology_split,
    load_digits_split,
)
from models.evaluate import Classifier, measure_accuracy, measure_latency, open_session
from models.export import (
    CYTOLOGY_INPUT_NAME,
    CYTOLOGY_INPUT_SHAPE,
    INPUT_NAME,
    INPUT_SHAPE,
    OUTPUT_NAMES,
    PRODUCER_NAME,
)
from models.gate import GateReport, ModelScore, check_candidate, format_report
from models.golden import make_golden
from models.optimize import (
    BundleVariant,
    ReleaseBundle,
    VariantBuild,
    build_variants,
    format_bundle,
    read_bundle,
)
from models.precision import PRECISIONS, Precision, detect_precision
from models.zoo import DEMO_MODEL_NAMES, TASKS, DemoModel, Task, build_demo_models

__all__ = [
    "CYTOLOGY_INPUT_NAME",
    "CYTOLOGY_INPUT_SHAPE",
    "DEMO_MODEL_NAMES",
    "INPUT_NAME",
    "INPUT_SHAPE",
    "OUTPUT_NAMES",
    "PRECISIONS",
    "PRODUCER_NAME",
    "TASKS",
    "BundleVariant",
    "Classifier",
    "CytologySplit",
    "DataSet",
    "DemoModel",
    "DigitsSplit",
    "DigitsStream",
    "GateReport",
    "ModelScore",
    "Precision",
    "ReleaseBundle",
    "Split",
    "Task",
    "VariantBuild",
    "build_demo_models",
    "build_variants",
    "check_candidate",
    "detect_precision",
    "format_bundle",
    "format_report",
    "load_cytology_split",
    "load_dataset",
    "load_digits_split",
    "make_golden",
    "measure_accuracy",
    "measure_latency",
    "open_session",
    "read_bundle",
    "save_dataset",
]
