"""The ``edgefleet model`` commands: build the demo models, optimise a model into
per-class variants, and run the accuracy gate."""

from __future__ import annotations

import argparse
from pathlib import Path

from coordinator.profiles import DEFAULT_PROFILES, PRECISIONS, load_profiles
from edgefleet.modeltools import optimize_for_classes, validate_model
from models import build_demo_models
from models.datafile import load_dataset
from models.gate import format_report

__all__ = ["Commands", "add_model_commands"]

Commands = argparse._SubParsersAction
"""The type of ``add_subparsers()``: argparse names no public one."""


def add_model_commands(sub: Commands[argparse.ArgumentParser]) -> None:
    """``edgefleet model build|optimize|validate``."""
    model = sub.add_parser("model", help="models: build, optimise, validate")
    models = model.add_subparsers(required=True)
    p = models.add_parser("build", help="train the demo models, export them to ONNX")
    p.add_argument("--out", default="demo-models")
    p.set_defaults(func=_model_build)
    p = models.add_parser(
        "optimize",
        help="build per-class variants (fp32, fp16, int8 static and dynamic) with golden vectors",
    )
    p.add_argument("model", help="the fp32 ONNX model")
    p.add_argument("--calibration", required=True, help="data set (.npz) to calibrate int8 with")
    p.add_argument(
        "--data", help="labelled held-out data set (.npz); default: the calibration file's"
    )
    p.add_argument("--classes", default=str(DEFAULT_PROFILES), help="hardware class profiles")
    p.add_argument(
        "--datasets",
        help="folder of the data sets the classes' gates name (default: --data's folder)",
    )
    p.add_argument(
        "--precision",
        action="append",
        default=[],
        choices=PRECISIONS,
        help="build only these (repeatable); default: every precision some class runs",
    )
    p.add_argument("--name", help="release name (default: the model file's stem)")
    p.add_argument("--out", help="output folder (default: MODEL's stem + .variants)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads when timing")
    p.set_defaults(func=_model_optimize)
    p = models.add_parser(
        "validate", help="the accuracy gate: a candidate against a baseline on held-out data"
    )
    p.add_argument("candidate")
    p.add_argument("--baseline", help="the model the fleet runs now")
    p.add_argument("--data", required=True, help="labelled held-out data set (.npz)")
    p.add_argument(
        "--max-drop", type=float, default=1.0, help="accuracy points the candidate may lose"
    )
    p.add_argument("--min-accuracy", type=float, help="absolute floor (0..1)")
    p.add_argument("--runs", type=int, default=200, help="single-sample runs timed per model")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads when timing")
    p.set_defaults(func=_model_validate)


def _model_build(args: argparse.Namespace) -> int:
    for model in build_demo_models(Path(args.out)).values():
        print(f"{model.name:<15} {model.path}  accuracy {model.holdout_accuracy:.4f}")
    print(f"data sets (calibration and held-out splits): {Path(args.out)}/<task>.npz")
    return 0


def _model_optimize(args: argparse.Namespace) -> int:
    model = Path(args.model)
    calibration = load_dataset(Path(args.calibration), "calibration")
    holdout = load_dataset(Path(args.data or args.calibration), "holdout")
    out = Path(args.out) if args.out else model.with_name(f"{model.stem}.variants")
    datasets = Path(args.datasets) if args.datasets else Path(args.data or args.calibration).parent
    precisions = tuple(args.precision) or None
    _, text = optimize_for_classes(
        model,
        calibration,
        holdout,
        load_profiles(Path(args.classes)),
        out_dir=out,
        datasets_dir=datasets,
        precisions=precisions,
        name=args.name,
        threads=args.threads,
    )
    print(text)
    return 0


def _model_validate(args: argparse.Namespace) -> int:
    report = validate_model(
        Path(args.candidate),
        Path(args.baseline) if args.baseline else None,
        load_dataset(Path(args.data), "holdout"),
        max_drop_points=args.max_drop,
        min_accuracy=args.min_accuracy,
        latency_runs=args.runs,
        threads=args.threads,
    )
    print(format_report(report))
    return 0 if report.passed else 1
