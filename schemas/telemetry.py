"""Telemetry summaries: one fixed window of a device's inference, summarised.

Everything in a summary is mergeable without loss of counts: latencies go into
log-spaced buckets (relative error bounded by the bucket ratio), confidences into
fixed bins, predicted labels into counts. The agent's store-and-forward queue merges
its oldest windows into coarser ones when full, so resolution drops but no
inference is silently forgotten.

Delivery is end to end. The agent's outbox numbers its summaries: ``stream`` names the
outbox (a new one, as on a reinstalled device, starts a new stream) and ``seq ..
last_seq`` are the consecutive numbers a summary stands for (more than one once merged:
only summaries with adjacent ranges merge, and only before either was sent). ``base`` is
the lowest number the device still held when it sent the summary: every number below it
was acknowledged or is lost on the device. The coordinator counts a device's stream in
order, keeps its high-water mark durably, and says so in a :class:`TelemetryAck` (retained
on ``devices/{id}/ack``); the device deletes what the ack covers. Summaries without a
``stream`` (agents before end-to-end delivery) are still taken, de-duplicated by id.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from itertools import pairwise
from typing import Annotated, Final

from pydantic import Field, field_validator, model_validator

from schemas.codec import WireModel

__all__ = [
    "CONFIDENCE_BINS",
    "LATENCY_GAMMA",
    "MAX_LABELS",
    "MAX_LABEL_CHARS",
    "MAX_SEQ",
    "MAX_STREAM_CHARS",
    "OTHER_LABEL",
    "LogHistogram",
    "TelemetryAck",
    "TelemetrySummary",
    "bound_labels",
    "confidence_bin",
    "latency_bucket",
    "merge_summaries",
]

LATENCY_GAMMA: Final = 1.1
"""Ratio between successive latency bucket bounds: quantiles are within 10%."""
CONFIDENCE_BINS: Final = 10
MAX_LABELS: Final = 256
"""Distinct predicted labels a summary counts; the rarest beyond go to ``OTHER_LABEL``."""
MAX_LABEL_CHARS: Final = 64
OTHER_LABEL: Final = "…other"
_MIN_MS: Final = 1e-3
MAX_SEQ: Final = 2**53 - 1
"""The last summary number (exact in every msgpack and JSON reader)."""
MAX_STREAM_CHARS: Final = 64


def latency_bucket(ms: float) -> int:
    """Index of the bucket ``(GAMMA**(i-1), GAMMA**i]`` holding ``ms``."""
    return math.ceil(math.log(max(ms, _MIN_MS)) / math.log(LATENCY_GAMMA))


def bound_labels(counts: Counter[str]) -> dict[str, int]:
    """Label counts within the schema's bounds, every count kept: labels come from a
    model's output, so they are cut to ``MAX_LABEL_CHARS`` and the rarest beyond
    ``MAX_LABELS`` are counted together under ``OTHER_LABEL``."""
    cut: Counter[str] = Counter()
    for label, n in counts.items():
        cut[label[:MAX_LABEL_CHARS]] += n
    if len(cut) <= MAX_LABELS:
        return dict(cut)
    other = cut.pop(OTHER_LABEL, 0)  # from an earlier bound: stays the catch-all
    kept = dict(cut.most_common(MAX_LABELS - 1))
    kept[OTHER_LABEL] = other + sum(cut.values()) - sum(kept.values())
    return kept


def confidence_bin(p: float) -> int:
    return min(CONFIDENCE_BINS - 1, max(0, int(p * CONFIDENCE_BINS)))


class LogHistogram(WireModel):
    buckets: tuple[tuple[int, int], ...] = ()
    """Sorted ``(bucket index, count)`` pairs; empty buckets are left out."""

    @field_validator("buckets")
    @classmethod
    def _canonical(cls, buckets: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
        if any(n <= 0 for _, n in buckets):
            msg = "bucket counts must be positive"
            raise ValueError(msg)
        if any(b[0] <= a[0] for a, b in pairwise(buckets)):
            msg = "bucket indices must strictly increase"
            raise ValueError(msg)
        return buckets

    @classmethod
    def of(cls, values_ms: Iterable[float]) -> LogHistogram:
        return cls.from_counts(Counter(latency_bucket(v) for v in values_ms))

    @classmethod
    def from_counts(cls, counts: Counter[int]) -> LogHistogram:
        return cls(buckets=tuple(sorted((i, n) for i, n in counts.items() if n)))

    @property
    def count(self) -> int:
        return sum(n for _, n in self.buckets)

    def merge(self, other: LogHistogram) -> LogHistogram:
        counts: Counter[int] = Counter(dict(self.buckets))
        counts.update(dict(other.buckets))
        return LogHistogram.from_counts(counts)

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding quantile ``q``; None when empty."""
        total = self.count
        if total == 0:
            return None
        rank = q * total
        seen = 0
        for index, n in self.buckets:
            seen += n
            if seen >= rank:
                return float(LATENCY_GAMMA**index)
        return float(LATENCY_GAMMA ** self.buckets[-1][0])


class TelemetrySummary(WireModel):
    summary_id: str
    device_id: str
    release: str | None
    window_start: float
    window_end: float
    windows: int = Field(default=1, ge=1)
    """How many original windows this summary stands for (>1 once coarsened)."""
    count: int = Field(ge=0)
    errors: int = Field(ge=0)
    latency_ms: LogHistogram
    confidence: tuple[int, ...] = Field(min_length=CONFIDENCE_BINS, max_length=CONFIDENCE_BINS)
    labels: dict[Annotated[str, Field(max_length=MAX_LABEL_CHARS)], int] = Field(
        default_factory=dict, max_length=MAX_LABELS
    )
    max_rss_bytes: int = 0
    stream: str | None = Field(default=None, min_length=1, max_length=MAX_STREAM_CHARS)
    """The device's outbox this summary was numbered in; None from agents before
    end-to-end delivery (then ``seq``, ``last_seq`` and ``base`` are None too)."""
    seq: int | None = Field(default=None, ge=1, le=MAX_SEQ)
    last_seq: int | None = Field(default=None, ge=1, le=MAX_SEQ)
    base: int | None = Field(default=None, ge=1, le=MAX_SEQ)

    @model_validator(mode="after")
    def _numbered(self) -> TelemetrySummary:
        numbers = (self.seq, self.last_seq, self.base)
        if self.stream is None:
            if any(n is not None for n in numbers):
                msg = "seq, last_seq and base need a stream"
                raise ValueError(msg)
            return self
        if self.seq is None or self.last_seq is None or self.base is None:
            msg = "a numbered summary has seq, last_seq and base"
            raise ValueError(msg)
        if not self.base <= self.seq <= self.last_seq:
            msg = "need base <= seq <= last_seq"
            raise ValueError(msg)
        return self


class TelemetryAck(WireModel):
    """What the coordinator has durably counted of one device's stream: every summary
    numbered up to ``seq`` (retained on ``devices/{id}/ack``, one per device)."""

    device_id: str = Field(max_length=64)
    stream: str = Field(min_length=1, max_length=MAX_STREAM_CHARS)
    seq: int = Field(ge=0, le=MAX_SEQ)
    at: float


def merge_summaries(first: TelemetrySummary, second: TelemetrySummary) -> TelemetrySummary:
    """One coarser summary standing for both; keeps ``first``'s id and release.

    Counts are conserved exactly; only time resolution is lost. Numbered summaries merge
    only with the next one of the same stream (``second.seq == first.last_seq + 1``), so
    the merged range covers exactly what both did.

    Raises:
        ValueError: the two are numbered, and not adjacent in one stream.
    """
    if (first.stream, second.stream) != (None, None) and (
        first.stream != second.stream or first.last_seq is None or second.seq != first.last_seq + 1
    ):
        msg = "only adjacent summaries of one stream merge"
        raise ValueError(msg)
    labels = Counter(first.labels)
    labels.update(second.labels)
    return TelemetrySummary(
        summary_id=first.summary_id,
        device_id=first.device_id,
        release=first.release if first.release == second.release else None,
        window_start=min(first.window_start, second.window_start),
        window_end=max(first.window_end, second.window_end),
        windows=first.windows + second.windows,
        count=first.count + second.count,
        errors=first.errors + second.errors,
        latency_ms=first.latency_ms.merge(second.latency_ms),
        confidence=tuple(a + b for a, b in zip(first.confidence, second.confidence, strict=True)),
        labels=bound_labels(labels),
        max_rss_bytes=max(first.max_rss_bytes, second.max_rss_bytes),
        stream=first.stream,
        seq=first.seq,
        last_seq=second.last_seq,
        base=None if first.base is None else min(first.base, second.base or first.base),
    )
