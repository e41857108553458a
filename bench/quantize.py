"""INT8 builds against their FP32 originals, measured in one run on this machine.

For digits-v2, digits-v3 and cytology-v1 this builds the int8-static and int8-dynamic
variants (``models.optimize.build_variants``, calibrated on the demo data set's
calibration rows) and measures, with the same onnxruntime settings for all (CPU
provider, ``--threads`` intra-op threads, default 1):

* size, and the ratio fp32 / int8;
* single-sample latency: median of ``--runs`` ``session.run`` calls on real held-out rows
  one at a time, after warm-up; variants take turns in short blocks so that a noisy
  neighbour on the machine slows them alike;
* batch latency: median over calls on ``--batch`` held-out rows at once;
* held-out accuracy, and the drop in points from fp32.

Goals per int8 build: at least 2x smaller, at least 1.5x faster (single-sample and batch
are judged separately), at most 1 point less accurate. Human-readable lines come first;
the last line is one JSON object with every figure.

Run: ``.venv/bin/python bench/quantize.py [--models DIR] [--threads N]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from models import Classifier, DataSet, build_demo_models, build_variants, load_dataset
from models.precision import Precision
from models.report import format_size, text_table

MODELS = ("digits-v2", "digits-v3", "cytology-v1")
INT8: tuple[Precision, ...] = ("int8", "int8-dynamic")
GOAL_SIZE_RATIO = 2.0
GOAL_SPEEDUP = 1.5
GOAL_MAX_DROP_POINTS = 1.0
BLOCK = 50
"""Calls a variant makes before the next one takes its turn."""


@dataclass(frozen=True)
class Measured:
    size: int
    accuracy: float
    single_us: float
    batch_us: float


@dataclass(frozen=True)
class Compared:
    size_ratio: float
    single_speedup: float
    batch_speedup: float
    accuracy_drop_points: float
    smaller_2x: bool
    faster_1_5x_single: bool
    faster_1_5x_batch: bool
    drop_within_1_point: bool


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, help="demo model cache folder (default: temp)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--runs", type=int, default=3000, help="single-sample runs per build")
    parser.add_argument("--batch", type=int, default=256, help="rows per batch call")
    parser.add_argument("--batch-runs", type=int, default=60, help="batch calls per build")
    args = parser.parse_args(argv)
    if args.models is not None:
        return run(args.models, args)
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        return run(Path(tmp), args)


def run(folder: Path, args: argparse.Namespace) -> int:
    started = time.perf_counter()
    machine = _machine(args.threads)
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, ISA {machine['isa']}; "
        f"onnxruntime {machine['onnxruntime']}, {args.threads} intra-op thread(s)"
    )
    t0 = time.perf_counter()
    demo = build_demo_models(folder)
    print(f"demo models ready in {time.perf_counter() - t0:.1f} s ({folder})")
    report: dict[str, Any] = {"machine": machine, "threads": args.threads, "models": {}}
    for name in MODELS:
        model = demo[name]
        calibration = load_dataset(model.dataset, "calibration")
        holdout = load_dataset(model.dataset, "holdout")
        t0 = time.perf_counter()
        builds = build_variants(model.path.read_bytes(), calibration, precisions=("fp32", *INT8))
        built_s = time.perf_counter() - t0
        measured = _measure({b.label: b.data for b in builds}, holdout, args)
        fp32 = measured["fp32"]
        compared = {label: _compare(fp32, m) for label, m in measured.items() if label != "fp32"}
        _print_model(name, built_s, len(holdout.x), measured, compared)
        report["models"][name] = {
            "holdout_samples": len(holdout.x),
            "build_s": round(built_s, 3),
            "variants": {label: asdict(m) for label, m in measured.items()},
            "vs_fp32": {label: asdict(c) for label, c in compared.items()},
        }
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    print(f"done in {report['elapsed_s']} s")
    print(json.dumps(report, sort_keys=True))
    return 0


def _measure(
    models: dict[str, bytes], holdout: DataSet, args: argparse.Namespace
) -> dict[str, Measured]:
    if holdout.y is None:
        raise ValueError(f"{holdout.source} has no labels")
    y = holdout.y
    classifiers = {
        label: Classifier(data, intra_op_threads=args.threads) for label, data in models.items()
    }
    rows = [np.ascontiguousarray(holdout.x[i : i + 1]) for i in range(len(holdout.x))]
    # Held-out rows repeated up to the batch size (cytology has fewer than 256).
    batch = np.ascontiguousarray(holdout.x[np.arange(args.batch) % len(holdout.x)])
    single = _interleaved(classifiers, rows, args.runs)
    batched = _interleaved(classifiers, [batch], args.batch_runs)
    return {
        label: Measured(
            size=len(models[label]),
            accuracy=classifier.accuracy(holdout.x, y),
            single_us=single[label],
            batch_us=batched[label],
        )
        for label, classifier in classifiers.items()
    }


def _interleaved(
    classifiers: dict[str, Classifier], feeds: list[npt.NDArray[np.float32]], runs: int
) -> dict[str, float]:
    """Median microseconds per ``run`` call of each classifier, in turns of ``BLOCK`` calls."""
    times: dict[str, list[float]] = {label: [] for label in classifiers}
    for classifier in classifiers.values():  # warm-up: allocations, caches, lazy init
        for i in range(min(runs, 2 * BLOCK)):
            classifier.session.run(None, {classifier.input_name: feeds[i % len(feeds)]})
    done = 0
    while done < runs:
        block = min(BLOCK, runs - done)
        for label, classifier in classifiers.items():
            name = classifier.input_name
            for i in range(done, done + block):
                feed = {name: feeds[i % len(feeds)]}
                start = time.perf_counter()
                classifier.session.run(None, feed)
                times[label].append(time.perf_counter() - start)
        done += block
    return {label: float(np.median(t)) * 1e6 for label, t in times.items()}


def _compare(fp32: Measured, int8: Measured) -> Compared:
    size_ratio = fp32.size / int8.size
    single = fp32.single_us / int8.single_us
    batch = fp32.batch_us / int8.batch_us
    drop = (fp32.accuracy - int8.accuracy) * 100.0
    return Compared(
        size_ratio=round(size_ratio, 3),
        single_speedup=round(single, 3),
        batch_speedup=round(batch, 3),
        accuracy_drop_points=round(drop, 3),
        smaller_2x=size_ratio >= GOAL_SIZE_RATIO,
        faster_1_5x_single=single >= GOAL_SPEEDUP,
        faster_1_5x_batch=batch >= GOAL_SPEEDUP,
        drop_within_1_point=drop <= GOAL_MAX_DROP_POINTS,
    )


def _print_model(
    name: str,
    built_s: float,
    samples: int,
    measured: dict[str, Measured],
    compared: dict[str, Compared],
) -> None:
    print(f"\n{name}: variants built in {built_s:.2f} s; accuracy on {samples} held-out rows")
    header = ("build", "size", "accuracy", "1 row us", "batch us", "x smaller", "x faster 1/batch")
    rows = []
    for label, m in measured.items():
        c = compared.get(label)
        rows.append(
            (
                label,
                format_size(m.size),
                f"{m.accuracy * 100:.2f}%",
                f"{m.single_us:.1f}",
                f"{m.batch_us:.0f}",
                "-" if c is None else f"{c.size_ratio:.2f}",
                "-" if c is None else f"{c.single_speedup:.2f} / {c.batch_speedup:.2f}",
            )
        )
    print(text_table(header, rows))
    for label, c in compared.items():
        goals = [
            f"{'ok' if c.smaller_2x else 'MISSED'} >=2x smaller",
            f"{'ok' if c.faster_1_5x_single else 'MISSED'} >=1.5x faster single-sample",
            f"{'ok' if c.faster_1_5x_batch else 'MISSED'} >=1.5x faster batch",
            f"{'ok' if c.drop_within_1_point else 'MISSED'} <=1 point drop "
            f"({c.accuracy_drop_points:+.2f})",
        ]
        print(f"  {label}: " + "; ".join(goals))


def _machine(threads: int) -> dict[str, Any]:
    cpu, flags = platform.processor() or platform.machine(), set[str]()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu in {"", platform.machine()}:
                cpu = value.strip()
            elif key.strip() in {"flags", "Features"} and not flags:
                flags = set(value.split())
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "asimddp") if f in flags]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "isa": "+".join(isa) or "unknown",
        "onnxruntime": ort.__version__,
        "python": sys.version.split()[0],
        "threads": threads,
    }


if __name__ == "__main__":
    sys.exit(main())
