"""``edgefleet model optimize`` and ``edgefleet model validate``: the models toolchain
(``models.optimize``, ``models.gate``) put together with the class profiles, so an
operator sees before a rollout which variant each class would take and why."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path

from coordinator.admission import Scores, first_passing, gate_data
from coordinator.profiles import ClassProfile
from coordinator.validate import ModelFacts
from coordinator.variants import Built, rank_variants
from models.datafile import DataSet
from models.gate import GateReport, check_candidate
from models.optimize import ReleaseBundle, format_bundle, optimize
from models.precision import Precision
from schemas import ArtifactRef, UsageError, Variant

__all__ = ["class_plan", "optimize_for_classes", "validate_model", "wanted_precisions"]


def wanted_precisions(profiles: Mapping[str, ClassProfile]) -> list[Precision]:
    """Every precision some class runs: fp16 only where a class's providers want it."""
    wanted = {p for profile in profiles.values() for p in profile.precisions}
    return [p for p in ("fp32", "fp16", "int8", "int8-dynamic") if p in wanted]


def optimize_for_classes(
    model: Path,
    calibration: DataSet,
    holdout: DataSet,
    profiles: Mapping[str, ClassProfile],
    *,
    out_dir: Path,
    datasets_dir: Path | None = None,
    precisions: Collection[Precision] | None = None,
    name: str | None = None,
    threads: int = 1,
) -> tuple[ReleaseBundle, str]:
    """Build, measure and write the variants; returns the bundle and a report: the
    variants' table, then the variant each class would take, its gate checked on the
    data sets in ``datasets_dir`` (blocking)."""
    bundle = optimize(
        model,
        calibration,
        holdout,
        precisions=precisions or wanted_precisions(profiles),
        out_dir=out_dir,
        name=name,
        threads=threads,
    )
    lines = [format_bundle(bundle), "", "per class (profile order, size limit, accuracy gate):"]
    lines += class_plan(bundle, profiles, datasets_dir)
    lines.append(f"written to {out_dir}")
    return bundle, "\n".join(lines)


def class_plan(
    bundle: ReleaseBundle, profiles: Mapping[str, ClassProfile], datasets_dir: Path | None
) -> list[str]:
    """The variant each class would take: the first its profile wants that fits and
    passes the class's gate against the fp32 original, on the held-out split of the data
    set the gate names (``<datasets_dir>/<name>.npz``, as the coordinator finds it)."""
    built = []
    data: dict[str, bytes] = {}
    for v in bundle.variants:
        blob = v.file.read_bytes()
        facts = ModelFacts(blob)
        data[v.label] = blob
        variant = Variant(
            label=v.label,
            artifact=ArtifactRef(sha256=v.sha256, size=v.size),
            inputs=facts.inputs,
            outputs=facts.outputs,
        )
        built.append(Built(variant, facts))
    reference = next(
        ((v.sha256, data[v.label]) for v in bundle.variants if v.precision == "fp32"), None
    )
    scores = Scores({v.sha256: data[v.label] for v in bundle.variants})
    lines = []
    for name, profile in profiles.items():
        order = rank_variants(built, {name: profile}, [name]).order[name]
        if not order:
            lines.append(f"  {name:<26} nothing fits (precision or size limit)")
            continue
        if profile.gate is None:
            lines.append(f"  {name:<26} {order[0].variant.label} (no accuracy gate)")
            continue
        try:
            holdout = gate_data(datasets_dir, profile.gate.dataset)
        except UsageError as exc:
            lines.append(f"  {name:<26} {order[0].variant.label} (gate not checked: {exc})")
            continue
        chosen, refused, report = first_passing(order, holdout, reference, profile.gate, scores)
        choice = (
            None
            if chosen is None or report is None
            else f"{chosen.variant.label} ({_drop(report)})"
        )
        line = f"  {name:<26} {choice or 'no variant passes the gate'}"
        if refused:
            line += f"; gate refused {' | '.join(refused)}"
        lines.append(line)
    return lines


def _drop(report: GateReport) -> str:
    text = f"accuracy {report.candidate.accuracy * 100:.2f}%"
    if report.baseline is not None:
        text += f" vs fp32 {report.baseline.accuracy * 100:.2f}%"
    return text


def validate_model(
    candidate: Path,
    baseline: Path | None,
    data: DataSet,
    *,
    max_drop_points: float,
    min_accuracy: float | None,
    latency_runs: int,
    threads: int,
) -> GateReport:
    """The coordinator's accuracy gate, with latency measured too (blocking)."""
    return check_candidate(
        candidate.read_bytes(),
        data,
        baseline=None if baseline is None else baseline.read_bytes(),
        max_drop_points=max_drop_points,
        min_accuracy=min_accuracy,
        latency_runs=latency_runs,
        threads=threads,
    )
