"""Judging a soak: live inference statistics against a release's health budget."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np

from schemas import HealthBudget, HealthReport, Verdict

if TYPE_CHECKING:
    from agent.events import Desired

__all__ = ["HealthCode", "SoakStats", "code_of", "health_report", "judge"]


class HealthCode(StrEnum):
    """Which part of a health budget a soak missed: the head of each reason string."""

    TOO_FEW_INFERENCES = "too_few_inferences"
    ERROR_RATE = "error_rate"
    P95_LATENCY_MS = "p95_latency_ms"


def code_of(reason: str) -> HealthCode:
    """The code a reason from :func:`judge` starts with.

    Raises:
        ValueError: ``reason`` is not one of :func:`judge`'s.
    """
    return HealthCode(reason.split(":", 1)[0])


@dataclass
class SoakStats:
    """Inference outcomes of one model since it was swapped in."""

    started: float
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def inferences(self) -> int:
        return len(self.latencies_ms) + self.errors

    def p95_ms(self) -> float | None:
        if not self.latencies_ms:
            return None
        return float(np.percentile(self.latencies_ms, 95))

    @staticmethod
    def figures(stats: SoakStats | None, now: float) -> dict[str, Any]:
        """A health report's figures of the soak ``stats`` (None: there was none)."""
        if stats is None:
            return {"inferences": 0, "errors": 0, "p95_latency_ms": None, "soak_seconds": 0.0}
        return {
            "inferences": stats.inferences,
            "errors": stats.errors,
            "p95_latency_ms": stats.p95_ms(),
            "soak_seconds": now - stats.started,
        }

    def ready(self, budget: HealthBudget, now: float) -> bool:
        """Soaked long enough, over enough inferences, to be judged."""
        return (
            now - self.started >= budget.soak_seconds and self.inferences >= budget.min_inferences
        )


def judge(stats: SoakStats, budget: HealthBudget) -> tuple[Verdict, tuple[str, ...]]:
    """The verdict on a soak, with machine-readable reasons when unhealthy."""
    reasons: list[str] = []
    if stats.inferences < budget.min_inferences:
        reasons.append(
            f"{HealthCode.TOO_FEW_INFERENCES}:{stats.inferences}<{budget.min_inferences}"
        )
    if stats.inferences:
        error_rate = stats.errors / stats.inferences
        if error_rate > budget.max_error_rate:
            reasons.append(f"{HealthCode.ERROR_RATE}:{error_rate:.3f}>{budget.max_error_rate:.3f}")
    p95 = stats.p95_ms()
    if p95 is not None and p95 > budget.p95_latency_ms:
        reasons.append(f"{HealthCode.P95_LATENCY_MS}:{p95:.2f}>{budget.p95_latency_ms:.2f}")
    return (Verdict.UNHEALTHY if reasons else Verdict.HEALTHY), tuple(reasons)


def health_report(
    desired: Desired,
    *,
    report_id: str,
    device_id: str,
    judged: tuple[Verdict, tuple[str, ...]],
    stats: SoakStats | None,
    now: float,
) -> HealthReport:
    """The report of a verdict on ``desired`` (``judged``: the verdict and its reasons),
    with the figures of its soak ``stats`` (None: there was none)."""
    assert desired.release is not None
    verdict, reasons = judged
    return HealthReport(
        report_id=report_id,
        device_id=device_id,
        rollout_id=desired.rollout_id,
        manifest_seq=desired.seq,
        release=desired.release.release_id,
        verdict=verdict,
        reasons=reasons,
        at=now,
        **SoakStats.figures(stats, now),
    )
