"""Rolling windows of telemetry, pure: mergeable tallies in time buckets.

Theory of operation. A :class:`Tally` holds counts that merge exactly: inferences,
errors, a log latency histogram, confidence bins and label counts. A device's
:class:`schemas.TelemetrySummary` is counted into one (:meth:`Tally.count_summary`)
clamped to what an honest agent sends (errors at most the count, no negative counts,
latency buckets within 1 us .. 1 h), so a hostile summary can neither grow a tally's
dictionaries past the latency range nor make a quantile overflow. A :class:`Ring` is one
window cut into time buckets (the last minute: six of 10 s; the last hour: sixty of
1 min): a tally goes into the bucket of its time, and into the window's running
``total``; when a bucket falls out of the window its tally is taken off the total. Adding
costs O(the tally's size), a bucket's expiry O(the bucket's size), reading a window O(the
total's size): never O(devices).

Labels are a vocabulary: a tally knows at most ``labels_kept`` of them, the rest are
counted under :data:`schemas.telemetry.OTHER_LABEL`. The owner maps a tally's labels once,
against its widest window's total (:meth:`Tally.relabelled`), and adds the mapped tally to
all its windows, so a label is counted under one name in every bucket and total; a label
whose count in the widest window falls to zero leaves the vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Final, TypeVar

from schemas import TelemetrySummary
from schemas.telemetry import CONFIDENCE_BINS, LATENCY_GAMMA, OTHER_LABEL, latency_bucket

__all__ = [
    "LATENCY_MAX_INDEX",
    "LATENCY_MIN_INDEX",
    "Ring",
    "Tally",
    "bucket_ms",
    "quantile_bucket",
]

K = TypeVar("K")

LATENCY_MIN_INDEX: Final = latency_bucket(1e-3)
"""The latency bucket of 1 us: every faster inference is counted here."""
LATENCY_MAX_INDEX: Final = latency_bucket(3_600_000.0)
"""The latency bucket of one hour: every slower inference is counted here."""


class Tally:
    """Counts that merge exactly: inferences, errors, a log latency histogram,
    confidence bins and label counts."""

    __slots__ = ("confidence", "count", "errors", "labels", "latency")

    def __init__(self, count: int = 0) -> None:
        self.count = count
        self.errors = 0
        self.latency: dict[int, int] = {}
        self.confidence = [0] * CONFIDENCE_BINS
        self.labels: dict[str, int] = {}

    def count_summary(self, summary: TelemetrySummary, labels_kept: int) -> None:
        """Add ``summary``, clamped to what an honest agent sends: errors at most the
        count, negative counts as none, latency buckets within 1 us .. 1 h; a label
        beyond ``labels_kept`` (the catch-all included) counts under ``OTHER_LABEL``."""
        count = summary.count
        self.count += count
        self.errors += min(summary.errors, count)
        latency = self.latency
        for index, n in summary.latency_ms.buckets:
            key = index if LATENCY_MIN_INDEX <= index <= LATENCY_MAX_INDEX else _clamp(index)
            latency[key] = latency.get(key, 0) + n
        confidence = self.confidence
        for index, n in enumerate(summary.confidence):
            if n > 0:
                confidence[index] += n
        labels = self.labels
        for label, n in summary.labels.items():
            if n <= 0:
                continue
            name = label if label in labels or len(labels) < labels_kept - 1 else OTHER_LABEL
            labels[name] = labels.get(name, 0) + n

    def add(self, other: Tally) -> None:
        self.count += other.count
        self.errors += other.errors
        latency = self.latency
        for index, n in other.latency.items():
            latency[index] = latency.get(index, 0) + n
        self.confidence = [a + b for a, b in zip(self.confidence, other.confidence, strict=True)]
        labels = self.labels
        for label, n in other.labels.items():
            labels[label] = labels.get(label, 0) + n

    def remove(self, other: Tally) -> None:
        """Take ``other`` (a part of this tally) off; keys whose count falls to zero go."""
        self.count -= other.count
        self.errors -= other.errors
        _take(self.latency, other.latency.items())
        self.confidence = [a - b for a, b in zip(self.confidence, other.confidence, strict=True)]
        _take(self.labels, other.labels.items())

    def clear(self) -> None:
        self.count = self.errors = 0
        self.latency.clear()
        self.confidence = [0] * CONFIDENCE_BINS
        self.labels.clear()

    def relabelled(self, known: Tally, labels_kept: int) -> Tally:
        """A copy whose labels that ``known`` does not know, once it knows
        ``labels_kept`` (the catch-all included), are counted under ``OTHER_LABEL``."""
        vocabulary = known.labels
        room = labels_kept - 1 - len(vocabulary) + (OTHER_LABEL in vocabulary)
        copy = Tally(self.count)
        copy.errors = self.errors
        copy.latency = dict(self.latency)
        copy.confidence = list(self.confidence)
        labels = copy.labels
        for label, n in self.labels.items():
            name = label
            if label not in vocabulary:
                if room > 0 and label != OTHER_LABEL:
                    room -= 1
                else:
                    name = OTHER_LABEL
            labels[name] = labels.get(name, 0) + n
        return copy

    def quantiles(self, *qs: float) -> tuple[int | None, ...]:
        """The latency bucket holding each quantile (None when no latency was counted):
        its upper bound is ``LATENCY_GAMMA ** index`` ms."""
        return quantile_bucket(sorted(self.latency.items()), qs)


def _clamp(index: int) -> int:
    return min(LATENCY_MAX_INDEX, max(LATENCY_MIN_INDEX, index))


def _take(table: dict[K, int], minus: Iterable[tuple[K, int]]) -> None:
    for key, n in minus:
        left = table.get(key, 0) - n
        if left > 0:
            table[key] = left
        else:
            table.pop(key, None)


def quantile_bucket(
    buckets: Sequence[tuple[int, int]], qs: Sequence[float]
) -> tuple[int | None, ...]:
    """For sorted ``(index, count)`` buckets, the index holding each quantile in ``qs``
    (ascending), as :meth:`schemas.LogHistogram.quantile` reads it."""
    total = sum(n for _, n in buckets)
    if total == 0:
        return tuple(None for _ in qs)
    found: list[int | None] = []
    seen = 0
    pairs = iter(buckets)
    index = buckets[0][0]
    for q in qs:
        rank = q * total
        while seen < rank:
            pair = next(pairs, None)
            if pair is None:
                break
            index, n = pair
            seen += n
        found.append(index)
    return tuple(found)


def bucket_ms(index: int) -> float:
    """The upper bound of latency bucket ``index``, in ms."""
    return float(LATENCY_GAMMA**index)


class Ring:
    """One rolling window: ``size`` buckets of ``bucket_s`` seconds (the newest is the
    one ``now`` falls in), and their running total."""

    __slots__ = ("_epochs", "_tallies", "bucket_s", "size", "total")

    def __init__(self, bucket_s: float, size: int) -> None:
        if bucket_s <= 0 or size < 1:
            msg = "a ring needs a positive bucket length and at least one bucket"
            raise ValueError(msg)
        self.bucket_s = bucket_s
        self.size = size
        self._epochs: list[int | None] = [None] * size
        self._tallies = [Tally() for _ in range(size)]
        self.total = Tally()

    @property
    def seconds(self) -> float:
        return self.bucket_s * self.size

    def _epoch(self, t: float) -> int:
        return math.floor(t / self.bucket_s)

    def _expire(self, slot: int) -> None:
        if self._epochs[slot] is not None:
            self.total.remove(self._tallies[slot])
            self._tallies[slot].clear()
            self._epochs[slot] = None

    def add(self, t: float, part: Tally, now: float) -> bool:
        """Count ``part`` at time ``t`` (at most ``now``); False when ``t`` is before the
        window."""
        epoch, newest = self._epoch(t), self._epoch(now)
        if not newest - self.size < epoch <= newest:
            return False
        slot = epoch % self.size
        if self._epochs[slot] != epoch:
            self._expire(slot)
            self._epochs[slot] = epoch
        self._tallies[slot].add(part)
        self.total.add(part)
        return True

    def advance(self, now: float) -> None:
        """Take every bucket outside the window ending at ``now`` off the total (also
        those ahead of ``now``, after the clock went back)."""
        newest = self._epoch(now)
        for slot, epoch in enumerate(self._epochs):
            if epoch is not None and not newest - self.size < epoch <= newest:
                self._expire(slot)
