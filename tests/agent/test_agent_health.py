"""Judging a soak against the release's health budget, with machine-readable reasons."""

from __future__ import annotations

from agent.health import SoakStats, judge
from agent.runtime import ModelSlot
from models import INPUT_NAME, DigitsSplit, DigitsStream
from schemas import HealthBudget, Verdict

BUDGET = HealthBudget(max_error_rate=0.01, p95_latency_ms=10.0, min_inferences=20, soak_seconds=5)


def _stats(latencies_ms: list[float], errors: int = 0) -> SoakStats:
    return SoakStats(started=0.0, latencies_ms=latencies_ms, errors=errors)


def _measure(slot: ModelSlot, split: DigitsSplit, n: int) -> SoakStats:
    stats = SoakStats(started=0.0)
    stream = DigitsStream(split, seed=1)
    for _ in range(n):
        stats.latencies_ms.append(slot.run({INPUT_NAME: next(stream)}).latency_ms)
    return stats


def test_soak_within_budget_is_healthy() -> None:
    assert judge(_stats([1.0 + i / 100 for i in range(100)], errors=1), BUDGET) == (
        Verdict.HEALTHY,
        (),
    )


def test_soak_exactly_at_budget_is_healthy() -> None:
    at_limit = _stats([10.0] * 99, errors=1)  # error rate 0.01, p95 10 ms
    assert judge(at_limit, BUDGET) == (Verdict.HEALTHY, ())


def test_p95_over_budget_is_unhealthy_with_its_reason() -> None:
    # 90 fast and 10 slow inferences: the 95th percentile lands among the slow ones.
    verdict, reasons = judge(_stats([2.0] * 90 + [25.0] * 10), BUDGET)
    assert verdict is Verdict.UNHEALTHY
    assert reasons == ("p95_latency_ms:25.00>10.00",)


def test_error_rate_over_budget_is_unhealthy_with_its_reason() -> None:
    verdict, reasons = judge(_stats([1.0] * 95, errors=5), BUDGET)
    assert verdict is Verdict.UNHEALTHY
    assert reasons == ("error_rate:0.050>0.010",)


def test_too_few_inferences_is_unhealthy_with_its_reason() -> None:
    verdict, reasons = judge(_stats([1.0] * 5), BUDGET)
    assert verdict is Verdict.UNHEALTHY
    assert reasons == ("too_few_inferences:5<20",)


def test_model_failing_every_inference_is_unhealthy_for_every_reason_that_applies() -> None:
    verdict, reasons = judge(_stats([], errors=3), BUDGET)
    assert verdict is Verdict.UNHEALTHY
    assert reasons == ("too_few_inferences:3<20", "error_rate:1.000>0.010")


def test_soak_is_ready_only_after_its_time_and_inference_count() -> None:
    stats = SoakStats(started=100.0, latencies_ms=[1.0] * 19)
    assert not stats.ready(BUDGET, now=106.0)
    stats.errors += 1  # a failed inference still counts as one
    assert not stats.ready(BUDGET, now=104.0)
    assert stats.ready(BUDGET, now=105.0)


def test_slow_build_is_judged_unhealthy_on_its_measured_latency(
    slow_slot: ModelSlot, v2_slot: ModelSlot, digits_split: DigitsSplit
) -> None:
    fast = _measure(v2_slot, digits_split, 40)
    assert judge(fast, BUDGET) == (Verdict.HEALTHY, ())

    slow = _measure(slow_slot, digits_split, 25)
    verdict, reasons = judge(slow, BUDGET)
    assert verdict is Verdict.UNHEALTHY
    assert len(reasons) == 1
    assert reasons[0].startswith("p95_latency_ms:")
    assert reasons[0].endswith(">10.00")
