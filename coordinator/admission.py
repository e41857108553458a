"""Admitting a rollout spec: which release each class's manifest will name, or why
none can be published.

Every variant must load, declare its inputs and outputs truthfully, and pass its own
golden vectors; variants that fit no class of the rollout are left out (and noted), and
every class must be fitted by some variant (``coordinator.variants``); then each class
takes the most wanted fitting variant that passes the class's accuracy gate against the
release the class runs now.
The gate is ``models.gate`` (``score_model`` and ``judge``, which ``check_candidate``
composes for ``edgefleet model validate``): the same check, with each model scored once.
Blocking (onnxruntime): the coordinator runs it in a thread with every artifact
already fetched and checked against its sha256.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from coordinator.profiles import AccuracyGate, ClassProfile
from coordinator.reasons import RolloutReason
from coordinator.validate import ModelFacts, golden_problems
from coordinator.variants import Built, rank_variants
from models.datafile import DataSet, load_dataset
from models.gate import GateReport, Scored, judge, score_model
from schemas import Cause, Release, RolloutSpec, UsageError

__all__ = ["Scores", "Selection", "first_passing", "gate_data", "select_releases"]


@dataclass(frozen=True)
class Selection:
    releases: dict[str, Release]
    """Class -> the release its manifest will name; empty when refused."""
    problems: tuple[str, ...]
    notes: tuple[str, ...]
    """What the gate measured for each class, for the audit log."""
    cause: Cause | None = None
    """What kind of check the problems failed; None when there are none."""

    def __post_init__(self) -> None:
        if bool(self.problems) != (self.cause is not None):
            msg = f"a selection with problems {self.problems!r} and cause {self.cause}"
            raise UsageError(msg)

    def refusal(self, chars: int) -> RolloutReason | None:
        """Why the spec is rejected, its text bounded to ``chars``; None when admitted."""
        if self.cause is None:
            return None
        return RolloutReason(cause=self.cause, problems=self.problems, chars=chars)


def select_releases(
    spec: RolloutSpec,
    blobs: Mapping[str, bytes],
    stables: Mapping[str, tuple[Release, bytes]],
    profiles: Mapping[str, ClassProfile],
    datasets_dir: Path | None,
) -> Selection:
    """``blobs``: every artifact the candidate names, by sha256; ``stables``: the
    release each class runs now and its model bytes (classes without one are absent)."""
    built, problems = _build(spec, blobs)
    if problems:
        return Selection({}, tuple(problems), (), Cause.INVALID_CANDIDATE)
    ranking = rank_variants(built, profiles, spec.classes)
    if ranking.problems:
        return Selection({}, ranking.problems, (), Cause.INVALID_CANDIDATE)
    gates = _Gates(stables, datasets_dir, Scores(blobs))
    releases: dict[str, Release] = {}
    notes: list[str] = [f"left out: {line}" for line in ranking.ignored]
    for name in spec.classes:
        profile = profiles[name]
        chosen = gates.choose(name, profile, ranking.order[name], notes)
        if isinstance(chosen, str):
            problems.append(chosen)
            continue
        releases[name] = profile.release(spec.candidate.name, chosen.variant, spec.shadow)
    if problems:
        return Selection({}, tuple(problems), tuple(notes), Cause.GATE_FAILED)
    return Selection(releases, (), tuple(notes))


def _build(spec: RolloutSpec, blobs: Mapping[str, bytes]) -> tuple[list[Built], list[str]]:
    """Every variant's facts, and why some do not load or fail their golden vectors."""
    built: list[Built] = []
    problems: list[str] = []
    for variant in spec.candidate.variants:
        try:
            facts = ModelFacts(blobs[variant.artifact.sha256])
        except ValueError as exc:
            problems.append(f"variant {variant.label}: {exc}")
            continue
        if variant.golden is not None:
            problems += [
                f"variant {variant.label}: {p}"
                for p in golden_problems(facts, variant, blobs[variant.golden.sha256])
            ]
        built.append(Built(variant, facts))
    return built, problems


class _Gates:
    """Each class's accuracy gate, with data sets loaded and models scored once."""

    def __init__(
        self,
        stables: Mapping[str, tuple[Release, bytes]],
        datasets_dir: Path | None,
        scores: Scores,
    ) -> None:
        self._stables = stables
        self._datasets_dir = datasets_dir
        self._scores = scores
        self._datasets: dict[str, DataSet] = {}

    def choose(
        self, name: str, profile: ClassProfile, order: Sequence[Built], notes: list[str]
    ) -> Built | str:
        """The variant class ``name`` takes (what the gate measured goes to ``notes``),
        or why none."""
        gate = profile.gate
        if gate is None:
            return order[0]
        try:
            data = self._datasets.get(gate.dataset) or gate_data(self._datasets_dir, gate.dataset)
        except UsageError as exc:
            return f"{name}: accuracy gate: {exc}"
        self._datasets[gate.dataset] = data
        stable = self._stables.get(name)
        baseline = None if stable is None else (stable[0].artifact.sha256, stable[1])
        chosen, refused, report = first_passing(order, data, baseline, gate, self._scores)
        if chosen is not None and report is not None:
            notes.append(f"{name}: {chosen.variant.label} {_measured(report)}")
        if refused:
            notes.append(f"{name}: gate refused {' | '.join(refused)}")
        if chosen is None:
            return f"{name}: no variant passes the accuracy gate ({' | '.join(refused)})"
        return chosen


class Scores:
    """Each model scored once per data set, however many classes gate on it."""

    def __init__(self, blobs: Mapping[str, bytes]) -> None:
        self._blobs = blobs
        self._done: dict[tuple[str, str], Scored] = {}

    def get(self, sha256: str, data: DataSet, role: str, model: bytes | None = None) -> Scored:
        """Raises: ValueError: the model does not load or does not fit the data."""
        key = (sha256, data.source)
        if key not in self._done:
            blob = self._blobs[sha256] if model is None else model
            self._done[key] = score_model(blob, data, role=role)
        return self._done[key]


def first_passing(
    order: Sequence[Built],
    data: DataSet,
    baseline: tuple[str, bytes] | None,
    gate: AccuracyGate,
    scores: Scores,
) -> tuple[Built | None, list[str], GateReport | None]:
    """The first of ``order`` that passes ``gate`` against ``baseline`` (sha256 and
    bytes) on ``data``, why the ones before it did not, and the chosen one's report."""
    refused = []
    for b in order:
        try:
            candidate = scores.get(b.variant.artifact.sha256, data, "candidate")
            against = (
                None if baseline is None else scores.get(baseline[0], data, "baseline", baseline[1])
            )
            report = judge(
                candidate,
                against,
                max_drop_points=gate.max_drop_points,
                min_accuracy=gate.min_accuracy,
            )
        except ValueError as exc:
            refused.append(f"{b.variant.label}: {exc}")
            continue
        if report.passed:
            return b, refused, report
        refused.append(f"{b.variant.label}: {'; '.join(report.problems)}")
    return None, refused, None


def gate_data(datasets_dir: Path | None, dataset: str) -> DataSet:
    """Raises: UsageError: no such data set, or one without labelled held-out data."""
    if datasets_dir is None:
        msg = f"no data sets are configured, and the class needs {dataset!r}"
        raise UsageError(msg)
    return load_dataset(datasets_dir / f"{dataset}.npz", "holdout")


def _measured(report: GateReport) -> str:
    text = f"accuracy {report.candidate.accuracy * 100:.2f}%"
    if report.baseline is not None:
        text += f", stable {report.baseline.accuracy * 100:.2f}%"
    if report.agreement is not None:
        text += f", agreement {report.agreement * 100:.1f}%"
    return text
