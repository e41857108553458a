"""The accuracy gate: may a candidate build replace a baseline, judged on real held-out data?

One check serves the operator (``edgefleet model validate``) and the coordinator (before
any device sees a candidate), so both refuse the same builds. A candidate fails when its
held-out accuracy is more than ``max_drop_points`` percentage points below the baseline's,
or below ``min_accuracy``. Labels are read as :class:`models.evaluate.Classifier` reads
them. Latency is measured only on request: it describes this machine, not a device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from models.datafile import DataSet
from models.evaluate import Classifier
from models.report import format_ms, format_size, text_table

__all__ = [
    "GateReport",
    "ModelScore",
    "Scored",
    "check_candidate",
    "format_report",
    "judge",
    "score_model",
]


@dataclass(frozen=True)
class ModelScore:
    """One model on the held-out data: size in bytes, accuracy in [0, 1], latency in ms."""

    size: int
    accuracy: float
    p50_ms: float | None
    p95_ms: float | None


@dataclass(frozen=True)
class GateReport:
    """What :func:`check_candidate` measured and why it failed, if it did."""

    candidate: ModelScore
    baseline: ModelScore | None
    agreement: float | None
    """Fraction of held-out rows where candidate and baseline predict the same label."""
    max_drop_points: float
    min_accuracy: float | None
    samples: int
    problems: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.problems


@dataclass(frozen=True, eq=False)
class Scored:
    """One model's score on one data set and the labels it gave, to judge against."""

    score: ModelScore
    labels: npt.NDArray[np.int64]
    source: str


def score_model(
    model: bytes, data: DataSet, *, role: str = "model", latency_runs: int = 0, threads: int = 1
) -> Scored:
    """Accuracy (and with ``latency_runs > 0`` single-sample p50/p95) of ``model`` on the
    labelled ``data``.

    Raises:
        ValueError: the model does not load or is no classifier, ``data`` does not fit its
            input or has no labels.
    """
    if data.y is None:
        raise ValueError(f"{data.source} has no labels: the gate needs held-out labels")
    if latency_runs < 0:
        raise ValueError(f"latency_runs must be >= 0, got {latency_runs}")
    try:
        classifier = Classifier(model, intra_op_threads=threads)
    except ValueError as exc:
        raise ValueError(f"{role}: {exc}") from exc
    classifier.check_fits(data.x, what=f"{role}: {data.source}")
    labels = classifier.labels(data.x)
    p50 = p95 = None
    if latency_runs > 0:
        p50, p95 = classifier.latency_ms(data.x, runs=latency_runs)
    accuracy = float(np.count_nonzero(labels == data.y)) / len(data.y)
    return Scored(ModelScore(len(model), accuracy, p50, p95), labels, data.source)


def judge(
    candidate: Scored,
    baseline: Scored | None = None,
    *,
    max_drop_points: float = 1.0,
    min_accuracy: float | None = None,
) -> GateReport:
    """The gate's verdict on two scores taken on the same data set.

    Raises:
        ValueError: a threshold is out of range, or the scores come from different data.
    """
    _check_thresholds(max_drop_points, min_accuracy)
    cand = candidate.score
    problems = []
    base = agreement = None
    if baseline is not None:
        if baseline.source != candidate.source or len(baseline.labels) != len(candidate.labels):
            raise ValueError(f"scores on {candidate.source} and {baseline.source} do not compare")
        base = baseline.score
        agreement = float(np.count_nonzero(candidate.labels == baseline.labels)) / len(
            candidate.labels
        )
        drop = (base.accuracy - cand.accuracy) * 100.0
        # A tolerance of a millionth of a point keeps an exact-limit drop from failing on
        # floating-point rounding of the two fractions.
        if drop > max_drop_points + 1e-6:
            problems.append(
                f"accuracy {cand.accuracy * 100:.2f}% is {drop:.2f} points below the "
                f"baseline's {base.accuracy * 100:.2f}% (allowed drop: {max_drop_points:g} "
                "points)"
            )
    if min_accuracy is not None and cand.accuracy < min_accuracy:
        problems.append(
            f"accuracy {cand.accuracy * 100:.2f}% is below the minimum of {min_accuracy * 100:.2f}%"
        )
    return GateReport(
        candidate=cand,
        baseline=base,
        agreement=agreement,
        max_drop_points=max_drop_points,
        min_accuracy=min_accuracy,
        samples=len(candidate.labels),
        problems=tuple(problems),
    )


def _check_thresholds(max_drop_points: float, min_accuracy: float | None) -> None:
    if max_drop_points < 0.0 or not np.isfinite(max_drop_points):
        raise ValueError(f"max_drop_points must be >= 0, got {max_drop_points}")
    if min_accuracy is not None and not 0.0 <= min_accuracy <= 1.0:
        raise ValueError(f"min_accuracy is a fraction in [0, 1], got {min_accuracy}")


def check_candidate(
    candidate: bytes,
    data: DataSet,
    *,
    baseline: bytes | None = None,
    max_drop_points: float = 1.0,
    min_accuracy: float | None = None,
    latency_runs: int = 0,
    threads: int = 1,
) -> GateReport:
    """Score ``candidate`` (and ``baseline``) on the labelled ``data`` and judge it.

    ``latency_runs > 0`` also measures single-sample p50/p95 over held-out rows with
    ``threads`` intra-op threads.

    Raises:
        ValueError: a model does not load or is no classifier, ``data`` does not fit its
            input, ``data`` has no labels, or a threshold is out of range.
    """
    _check_thresholds(max_drop_points, min_accuracy)
    cand = score_model(
        candidate, data, role="candidate", latency_runs=latency_runs, threads=threads
    )
    base = (
        None
        if baseline is None
        else score_model(
            baseline, data, role="baseline", latency_runs=latency_runs, threads=threads
        )
    )
    return judge(cand, base, max_drop_points=max_drop_points, min_accuracy=min_accuracy)


def format_report(report: GateReport) -> str:
    """A table (rows candidate/baseline; accuracy, agreement, p50, p95, size) and a last
    line ``PASS`` or ``FAIL: <problems>``."""
    header = ("model", "accuracy", "agreement", "p50 ms", "p95 ms", "size")
    agreement = "-" if report.agreement is None else f"{report.agreement * 100:.2f}%"
    rows = [_row("candidate", report.candidate, agreement)]
    if report.baseline is not None:
        rows.append(_row("baseline", report.baseline, "-"))
    verdict = "PASS" if report.passed else f"FAIL: {'; '.join(report.problems)}"
    return f"{text_table(header, rows)}\n{verdict}"


def _row(role: str, score: ModelScore, agreement: str) -> tuple[str, ...]:
    return (
        role,
        f"{score.accuracy * 100:.2f}%",
        agreement,
        format_ms(score.p50_ms),
        format_ms(score.p95_ms),
        format_size(score.size),
    )
