"""Telemetry summaries: quantiles within the bucket ratio, merges that lose no count."""

from __future__ import annotations

import functools
import random
from collections import Counter

import numpy as np
import pytest

from schemas import (
    LogHistogram,
    MalformedPayloadError,
    Reason,
    TelemetrySummary,
    decode,
    encode,
    merge_summaries,
)
from schemas.telemetry import CONFIDENCE_BINS, LATENCY_GAMMA, confidence_bin, latency_bucket

QUANTILES = (0.0, 0.01, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0)
LABELS = ("cat", "dog", "car", "person", "bike")
EPS = 1e-9


def _latencies(seed: int, n: int) -> list[float]:
    """Real-ish inference latencies: a lognormal body around 20 ms, slow outliers."""
    rng = np.random.default_rng(seed)
    body = rng.lognormal(mean=np.log(20.0), sigma=0.35, size=n)
    outliers = rng.uniform(80.0, 900.0, size=n // 50)
    fast = rng.uniform(0.05, 1.0, size=n // 100)
    return [float(x) for x in np.concatenate([body, outliers, fast])]


def _summary(seed: int, *, start: float, release: str | None = "m@abc") -> TelemetrySummary:
    rnd = random.Random(seed)
    n = rnd.randint(0, 400)
    latencies = _latencies(seed, n)[:n]
    confidences = [rnd.random() for _ in range(n)]
    labels = Counter(rnd.choice(LABELS) for _ in range(n))
    bins = Counter(confidence_bin(p) for p in confidences)
    return TelemetrySummary(
        summary_id=f"s-{seed}",
        device_id="dev-0001",
        release=release,
        window_start=start,
        window_end=start + 60.0,
        count=n,
        errors=rnd.randint(0, n // 10),
        latency_ms=LogHistogram.of(latencies),
        confidence=tuple(bins[i] for i in range(CONFIDENCE_BINS)),
        labels=dict(labels),
        max_rss_bytes=rnd.randint(0, 2**31),
    )


# --- LogHistogram ------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_quantiles_are_the_bucket_upper_bound_of_the_exact_order_statistic(seed: int) -> None:
    samples = _latencies(seed, 20_000)
    histogram = LogHistogram.of(samples)
    assert histogram.count == len(samples)
    for q in QUANTILES:
        estimate = histogram.quantile(q)
        assert estimate is not None
        exact = float(np.quantile(samples, q, method="inverted_cdf"))
        # An upper bound, never more than one bucket ratio above the truth.
        assert exact * (1 - EPS) <= estimate <= exact * LATENCY_GAMMA * (1 + EPS), q


@pytest.mark.parametrize("seed", [4, 5])
def test_quantiles_lie_within_the_bucket_ratio_of_numpy(seed: int) -> None:
    samples = _latencies(seed, 5_000)
    histogram = LogHistogram.of(samples)
    for q in (0.5, 0.9, 0.95, 0.99):
        estimate = histogram.quantile(q)
        assert estimate is not None
        reference = float(np.quantile(samples, q))
        # numpy interpolates between two neighbouring samples; when a bucket bound falls
        # between them the estimate may sit a hair beyond one ratio, hence the 0.1 %.
        slack = LATENCY_GAMMA * 1.001
        assert reference / slack <= estimate <= reference * slack, q


@pytest.mark.parametrize("seed", [4, 5])
def test_quantile_error_stays_within_the_documented_10_percent(seed: int) -> None:
    # LATENCY_GAMMA's docstring promises quantiles within 10 %, but quantile() returns
    # the bucket's upper bound, so it overestimates by up to the full ratio (20 %):
    # a candidate with a true p95 of 34 ms is reported at ~40 ms against a 40 ms budget.
    samples = _latencies(seed, 5_000)
    histogram = LogHistogram.of(samples)
    for q in (0.5, 0.9, 0.95, 0.99):
        estimate = histogram.quantile(q)
        assert estimate is not None
        exact = float(np.quantile(samples, q, method="inverted_cdf"))
        assert abs(estimate / exact - 1) <= 0.10, (q, estimate, exact)


def test_empty_histogram_has_no_quantile() -> None:
    assert LogHistogram().quantile(0.95) is None
    assert LogHistogram.of([]).count == 0


def test_bucket_bounds_are_upper_inclusive() -> None:
    for i in (-5, 0, 1, 10, 40):
        upper = LATENCY_GAMMA**i
        assert latency_bucket(upper * (1 + 1e-6)) == i + 1
        assert latency_bucket(upper * (1 - 1e-6)) == i


def test_zero_and_negative_latencies_land_in_the_lowest_bucket() -> None:
    lowest = latency_bucket(1e-3)
    assert latency_bucket(0.0) == lowest
    assert latency_bucket(-5.0) == lowest


def test_confidence_bins_clamp_to_the_range() -> None:
    assert [confidence_bin(p) for p in (-0.1, 0.0, 0.05, 0.1, 0.55, 0.999, 1.0, 1.5)] == [
        0, 0, 0, 1, 5, 9, 9, 9,
    ]  # fmt: skip


def test_histogram_merge_equals_histogram_of_all_values() -> None:
    a, b = _latencies(7, 3000), _latencies(8, 1000)
    merged = LogHistogram.of(a).merge(LogHistogram.of(b))
    assert merged == LogHistogram.of(a + b)
    assert merged.count == len(a) + len(b)
    assert merged.merge(LogHistogram()) == merged


@pytest.mark.parametrize(
    "buckets",
    [
        pytest.param([[3, 5], [3, 5]], id="repeated-bucket"),
        pytest.param([[9, 1], [3, 5]], id="unsorted"),
        pytest.param([[3, 0]], id="empty-bucket"),
        pytest.param([[3, -5]], id="negative-count"),
    ],
)
def test_non_canonical_histogram_from_a_device_is_rejected_schema(
    buckets: list[list[int]],
) -> None:
    # Accepted today: merge() folds a repeated bucket through dict() and silently drops
    # its counts, and quantile() walks the buckets in the order received.
    import msgpack

    data = msgpack.packb({"v": 1, "buckets": buckets})
    with pytest.raises(MalformedPayloadError) as info:
        decode(data, LogHistogram)
    assert info.value.reason is Reason.SCHEMA


# --- TelemetrySummary merges --------------------------------------------------------


def test_merge_conserves_every_count_across_many_merges() -> None:
    parts = [_summary(seed, start=1000.0 + 60.0 * seed) for seed in range(60)]
    rnd = random.Random(0)
    pool = list(parts)
    # Merge in a random tree shape, the way a queue coarsens its oldest windows.
    while len(pool) > 1:
        i, j = sorted(rnd.sample(range(len(pool)), 2))
        second, first = pool.pop(j), pool.pop(i)
        merged = merge_summaries(first, second)
        pool.append(decode(encode(merged), TelemetrySummary))
    (total,) = pool

    assert total.windows == len(parts)
    assert total.count == sum(p.count for p in parts)
    assert total.errors == sum(p.errors for p in parts)
    assert total.latency_ms.count == sum(p.latency_ms.count for p in parts)
    assert total.latency_ms == functools.reduce(
        LogHistogram.merge, (p.latency_ms for p in parts), LogHistogram()
    )
    assert total.confidence == tuple(
        sum(p.confidence[i] for p in parts) for i in range(CONFIDENCE_BINS)
    )
    assert Counter(total.labels) == sum((Counter(p.labels) for p in parts), Counter())
    assert total.window_start == min(p.window_start for p in parts)
    assert total.window_end == max(p.window_end for p in parts)
    assert total.max_rss_bytes == max(p.max_rss_bytes for p in parts)
    assert total.release == "m@abc"


def test_merge_is_order_independent_for_counts() -> None:
    a, b = _summary(1, start=0.0), _summary(2, start=60.0)
    ab, ba = merge_summaries(a, b), merge_summaries(b, a)
    assert ab.summary_id == a.summary_id
    assert ba.summary_id == b.summary_id
    assert ab.model_dump(exclude={"summary_id"}) == ba.model_dump(exclude={"summary_id"})


def test_merge_of_two_releases_forgets_the_release_but_no_count() -> None:
    a = _summary(1, start=0.0, release="m@abc")
    b = _summary(2, start=60.0, release="m@def")
    merged = merge_summaries(a, b)
    assert merged.release is None
    assert merged.count == a.count + b.count
    assert merged.windows == 2


def test_windows_add_up_through_nested_merges() -> None:
    a, b, c, d = (_summary(i, start=60.0 * i) for i in range(4))
    left = merge_summaries(a, b)
    right = merge_summaries(c, d)
    assert merge_summaries(left, right).windows == 4
    assert merge_summaries(merge_summaries(left, c), d).windows == 4
    assert merge_summaries(left, right).count == sum(s.count for s in (a, b, c, d))
