"""Numbered telemetry summaries, as an agent's outbox sends them, for the ledger's tests."""

from __future__ import annotations

from schemas import LogHistogram, TelemetrySummary

__all__ = ["numbered"]

T0 = 1_700_000_000.0


def numbered(
    first: int, last: int | None = None, *, base: int | None = None, stream: str = "s1"
) -> TelemetrySummary:
    """A summary of ``last - first + 1`` windows of 10 inferences (1 error) each."""
    last = first if last is None else last
    windows = last - first + 1
    return TelemetrySummary(
        summary_id=f"{stream}-{first}",
        device_id="cam-0001",
        release=None,
        window_start=T0 + first,
        window_end=T0 + last + 1,
        windows=windows,
        count=10 * windows,
        errors=windows,
        latency_ms=LogHistogram.of([1.0] * 9 * windows),
        confidence=(0,) * 9 + (9 * windows,),
        stream=stream,
        seq=first,
        last_seq=last,
        base=first if base is None else base,
    )
