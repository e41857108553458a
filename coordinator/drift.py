"""Drift, pure: how far a release's recent confidences and labels are from its reference.

Two measures, on counts (no sample is kept): the population stability index (PSI) of the
confidence bins and of the labels, ``sum((a - e) * ln(a / e))`` over the bins' shares,
each bin smoothed by half a count so that an empty bin stays finite (0.1 reads as a small
shift, 0.25 as a large one); and the Kolmogorov-Smirnov distance of the confidence bins,
the largest gap between the two cumulative shares. Labels are compared on the reference's
most frequent ones, every other label in one bin, so a window full of labels the
reference never saw counts as a shift and a label set costs O(its size).

The class's :class:`DriftPolicy` (in its profile) sets the threshold and how many
inferences the reference and the compared window need first.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from coordinator.windows import Ring, Tally
from schemas.telemetry import OTHER_LABEL

__all__ = ["DriftMeasure", "DriftPolicy", "judge_drift", "ks_distance", "label_bins", "psi"]

_SMOOTHING = 0.5
"""Counts added to every bin before shares are taken."""


class DriftPolicy(BaseModel):
    """When a class's releases count as drifted (``drift = {...}`` in its profile)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    psi: float = Field(default=0.25, gt=0.0, allow_inf_nan=False)
    """PSI (of the confidence bins, or of the labels) above which a release has drifted."""
    ks: float | None = Field(default=None, gt=0.0, le=1.0)
    """If set, a KS distance of the confidence bins above which it has drifted too."""
    min_inferences: int = Field(default=1000, ge=1)
    """Confidences (or labels) the compared window must hold to be judged."""
    reference_inferences: int = Field(default=1000, ge=1)
    """Inferences the reference must hold before drift is judged against it."""


def psi(expected: Sequence[int], actual: Sequence[int]) -> float | None:
    """The population stability index of ``actual`` against ``expected`` (the same
    bins); None when either is empty."""
    n_expected, n_actual = sum(expected), sum(actual)
    if n_expected <= 0 or n_actual <= 0:
        return None
    spread = _SMOOTHING * len(expected)
    total = 0.0
    for e, a in zip(expected, actual, strict=True):
        share_e = (e + _SMOOTHING) / (n_expected + spread)
        share_a = (a + _SMOOTHING) / (n_actual + spread)
        total += (share_a - share_e) * math.log(share_a / share_e)
    return total


def ks_distance(expected: Sequence[int], actual: Sequence[int]) -> float | None:
    """The largest gap between the cumulative shares of two binned distributions; None
    when either is empty."""
    n_expected, n_actual = sum(expected), sum(actual)
    if n_expected <= 0 or n_actual <= 0:
        return None
    gap = seen_e = seen_a = 0.0
    for e, a in zip(expected, actual, strict=True):
        seen_e += e
        seen_a += a
        gap = max(gap, abs(seen_e / n_expected - seen_a / n_actual))
    return gap


def label_bins(
    reference: Mapping[str, int], window: Mapping[str, int], top: int
) -> tuple[list[int], list[int]]:
    """Both label counts on the same bins: the reference's ``top`` most frequent labels,
    then one bin for every other label."""
    kept = [
        label
        for label in heapq.nlargest(top + 1, reference, key=reference.__getitem__)
        if label != OTHER_LABEL
    ][:top]
    ref = [reference[label] for label in kept]
    win = [window.get(label, 0) for label in kept]
    ref.append(sum(reference.values()) - sum(ref))
    win.append(sum(window.values()) - sum(win))
    return ref, win


@dataclass(frozen=True, slots=True)
class DriftMeasure:
    window_s: float
    """The window compared with the reference."""
    confidence_psi: float | None
    confidence_ks: float | None
    labels_psi: float | None
    over: bool
    """Past the threshold: an alert is raised."""
    clear: bool
    """Below ``clear_ratio`` of it: a raised alert is cleared."""


def judge_drift(
    policy: DriftPolicy,
    reference: Tally,
    windows: Sequence[Ring],
    *,
    clear_ratio: float,
    labels_compared: int,
) -> DriftMeasure | None:
    """The drift of the shortest of ``windows`` that holds ``policy.min_inferences``
    confidences or labels; None when none does."""
    for ring in windows:
        window = ring.total
        confident = sum(window.confidence) >= policy.min_inferences
        labelled = sum(window.labels.values()) >= policy.min_inferences
        if confident or labelled:
            break
    else:
        return None
    conf_psi = conf_ks = labels_psi = None
    if confident:
        conf_psi = psi(reference.confidence, window.confidence)
        conf_ks = ks_distance(reference.confidence, window.confidence)
    if labelled:
        labels_psi = psi(*label_bins(reference.labels, window.labels, labels_compared))
    scores = [(s, policy.psi) for s in (conf_psi, labels_psi) if s is not None]
    if policy.ks is not None and conf_ks is not None:
        scores.append((conf_ks, policy.ks))
    return DriftMeasure(
        window_s=ring.seconds,
        confidence_psi=conf_psi,
        confidence_ks=conf_ks,
        labels_psi=labels_psi,
        over=any(score > limit for score, limit in scores),
        clear=bool(scores) and all(score < limit * clear_ratio for score, limit in scores),
    )
