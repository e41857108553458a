"""Demo models for edgefleet: real digits classifiers exported to ONNX for devices."""

from models.datasets import DigitsSplit, DigitsStream, load_digits_split
from models.evaluate import measure_accuracy, measure_latency, open_session
from models.export import INPUT_NAME, INPUT_SHAPE, OUTPUT_NAMES, PRODUCER_NAME
from models.zoo import DEMO_MODEL_NAMES, DemoModel, build_demo_models

__all__ = [
    "DEMO_MODEL_NAMES",
    "INPUT_NAME",
    "INPUT_SHAPE",
    "OUTPUT_NAMES",
    "PRODUCER_NAME",
    "DemoModel",
    "DigitsSplit",
    "DigitsStream",
    "build_demo_models",
    "load_digits_split",
    "measure_accuracy",
    "measure_latency",
    "open_session",
]
