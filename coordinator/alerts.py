"""Alerts on running releases, pure: health after the soak, and the alarms both it and
drift raise.

Health. A release's budget (``schemas.HealthBudget``: maximum error rate, p95 latency,
minimum inferences) is what its devices met during their soak; :func:`judge_health`
holds the release to it for as long as it runs, on the shortest window (the last minute,
else the last hour) with at least ``min_inferences``. The p95 is read from the merged
log histogram, whose buckets are 10 % wide: over budget means even the bucket's lower
bound is over, back within it means its upper bound is below ``clear_ratio`` of it.

Hysteresis. An :class:`Alarm` is raised when a measure is over its limit and cleared only
once it is clearly below (``clear_ratio``): a measure between the two keeps the alarm as
it is, so a value near the limit does not flap. Each change is to be told (an audit entry,
:meth:`Alarm.due`), at most once per ``gap_s`` per alarm: changes in between are told
together, as the alarm stands then, with how many there were.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from coordinator.windows import LATENCY_MIN_INDEX, Ring, bucket_ms
from schemas import HealthBudget

__all__ = ["Alarm", "Alert", "AlertKind", "HealthMeasure", "judge_health"]


class AlertKind(StrEnum):
    DRIFT = "drift"
    HEALTH = "health"


@dataclass(frozen=True, slots=True)
class Alert:
    """A change of an alarm to write to the audit log."""

    kind: AlertKind
    hw_class: str
    release: str
    rollout_id: str | None
    raised: bool
    """The alarm as it stands now."""
    detail: str
    changes: int
    """Changes since the last entry of this alarm (more than one when rate-limited)."""

    @property
    def event(self) -> str:
        """The audit log's name for it."""
        if self.kind is AlertKind.DRIFT:
            return "drift" if self.raised else "drift_cleared"
        return "health_breach" if self.raised else "health_recovered"


@dataclass(slots=True)
class Alarm:
    raised: bool = False
    since: float | None = None
    """When it was raised (None while it is not)."""
    detail: str = ""
    """What the measure said when it last changed."""
    untold: int = 0
    """Changes not yet written to the audit log."""
    told_at: float = -math.inf

    def judge(self, *, over: bool, clear: bool, now: float, detail: str) -> None:
        """Raise on ``over``, clear on ``clear``, otherwise keep."""
        if not self.raised and over:
            self.raised, self.since = True, now
        elif self.raised and clear:
            self.raised, self.since = False, None
        else:
            return
        self.detail = detail
        self.untold += 1

    def due(self, now: float, gap_s: float) -> int:
        """How many changes to tell now (0: none, or told less than ``gap_s`` ago)."""
        if not self.untold or now - self.told_at < gap_s:
            return 0
        told, self.untold, self.told_at = self.untold, 0, now
        return told


@dataclass(frozen=True, slots=True)
class HealthMeasure:
    window_s: float
    inferences: int
    error_rate: float
    p95_ms: float | None
    """The upper bound of the p95's latency bucket."""
    over: bool
    clear: bool
    reasons: tuple[str, ...]
    """Each limit the window is over, as health reports word them."""


def judge_health(
    budget: HealthBudget, windows: tuple[Ring, ...], *, clear_ratio: float
) -> HealthMeasure | None:
    """The health of the shortest of ``windows`` with ``budget.min_inferences``; None
    when none has that many."""
    for ring in windows:
        if ring.total.count >= budget.min_inferences:
            break
    else:
        return None
    window = ring.total
    error_rate = window.errors / window.count
    (p95,) = window.quantiles(0.95)
    high = None if p95 is None else bucket_ms(p95)
    low = None if p95 is None or p95 <= LATENCY_MIN_INDEX else bucket_ms(p95 - 1)
    reasons = []
    if error_rate > budget.max_error_rate:
        reasons.append(f"error_rate:{error_rate:.3f}>{budget.max_error_rate:.3f}")
    if low is not None and low > budget.p95_latency_ms:
        reasons.append(f"p95_latency_ms:{low:.2f}>{budget.p95_latency_ms:.2f}")
    clear = error_rate <= budget.max_error_rate * clear_ratio and (
        high is None or high <= budget.p95_latency_ms * clear_ratio
    )
    return HealthMeasure(
        window_s=ring.seconds,
        inferences=window.count,
        error_rate=error_rate,
        p95_ms=high,
        over=bool(reasons),
        clear=clear,
        reasons=tuple(reasons),
    )
