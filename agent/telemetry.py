"""Summarising inference into fixed telemetry windows on the device."""

from __future__ import annotations

import resource
import uuid
from collections import Counter

from agent.runtime import Tally
from schemas import LogHistogram, TelemetrySummary
from schemas.telemetry import CONFIDENCE_BINS, bound_labels, confidence_bin, latency_bucket

__all__ = ["TelemetryWindow"]


class TelemetryWindow:
    """Accumulates one window; :meth:`close` turns it into a summary and starts anew."""

    def __init__(self, device_id: str, started: float) -> None:
        self._device_id = device_id
        self._reset(started, None)

    def _reset(self, started: float, release: str | None) -> None:
        self._started = started
        self._release = release
        self._count = 0
        self._errors = 0
        self._latency: Counter[int] = Counter()
        self._confidence = [0] * CONFIDENCE_BINS
        self._labels: Counter[str] = Counter()

    def record(self, tally: Tally) -> None:
        """Count the inferences of ``tally``."""
        self._release = tally.release_id
        self._count += tally.count
        self._errors += tally.errors
        for latency_ms, count in tally.runs:
            self._latency[latency_bucket(latency_ms)] += count
        bins = self._confidence
        for confidence in tally.confidences:
            bins[confidence_bin(confidence)] += 1
        for label, count in tally.labels.items():
            self._labels[str(label)] += count

    def close(self, now: float) -> TelemetrySummary:
        summary = TelemetrySummary(
            summary_id=uuid.uuid4().hex,
            device_id=self._device_id,
            release=self._release,
            window_start=self._started,
            window_end=now,
            count=self._count,
            errors=self._errors,
            latency_ms=LogHistogram.from_counts(self._latency),
            confidence=tuple(self._confidence),
            labels=bound_labels(self._labels),
            max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        )
        self._reset(now, self._release)
        return summary
