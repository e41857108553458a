"""Numbered telemetry summaries, as an agent's outbox sends them, for the ledger's tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from schemas import LogHistogram, TelemetrySummary

__all__ = ["numbered", "window"]

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


def window(
    device_id: str = "cam-0001",
    *,
    release: str | None = "digits-v2:fp32@abababababab",
    end: float = T0,
    count: int = 100,
    errors: int = 0,
    latency_ms: Sequence[float] = (2.0,),
    confidence: Sequence[int] | None = None,
    labels: Mapping[str, int] | None = None,
) -> TelemetrySummary:
    """One unnumbered window of ``count`` inferences of ``release`` ending at ``end``: its
    successes spread evenly over ``latency_ms``, all in the top confidence bin and over
    the labels ``0``..``9`` unless given."""
    answered = count - errors
    latencies = [latency_ms[i % len(latency_ms)] for i in range(answered)]
    spread = {str(d): answered // 10 + (d < answered % 10) for d in range(10)}
    return TelemetrySummary(
        summary_id=f"{device_id}-{end}",
        device_id=device_id,
        release=release,
        window_start=end - 10.0,
        window_end=end,
        count=count,
        errors=errors,
        latency_ms=LogHistogram.of(latencies),
        confidence=tuple(confidence) if confidence is not None else (0,) * 9 + (answered,),
        labels=dict(labels) if labels is not None else {k: n for k, n in spread.items() if n},
    )
