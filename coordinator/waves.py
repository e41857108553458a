"""How far a wave reaches: bucket cutoffs for percent and count waves, paced or not.

Devices are ordered within a rollout by their stable bucket (``schemas.bucket(salt,
device_id)``, ``0..BUCKETS-1``); a class's manifest covers the devices below its cutoff
(and the canaries). A percent wave's cutoff follows from the percent alone; a count
wave's from the buckets of the class's known devices, sorted (``ranked``). Pure.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from schemas import WaveSpec
from schemas.manifest import BUCKETS

__all__ = ["covered", "paced_cutoff", "percent_cutoff", "wave_cutoff"]


def percent_cutoff(percent: float) -> int:
    # Rounded before ceil: 0.07 % is 7 buckets, though 0.07 * 10000 / 100 is 7.000000000000001.
    return min(BUCKETS, math.ceil(round(percent * BUCKETS / 100.0, 6)))


def wave_cutoff(wave: WaveSpec, ranked: Sequence[int]) -> int:
    """The cutoff that reaches ``wave``'s percent, or its first ``count`` devices of
    ``ranked`` (all of them, and any that join, when there are no more)."""
    if wave.percent is not None:
        return percent_cutoff(wave.percent)
    count = wave.count or 0
    if count >= len(ranked):
        return BUCKETS
    return ranked[count - 1] + 1


def covered(ranked: Sequence[int], cutoff: int) -> int:
    """How many of ``ranked`` lie below ``cutoff``."""
    return bisect.bisect_left(ranked, cutoff)


def paced_cutoff(
    ranked: Sequence[int],
    *,
    current: int,
    target: int,
    allowed: int,
) -> int:
    """The highest cutoff up to ``target`` that covers at most ``allowed`` devices of
    ``ranked`` (never below ``current``: a wave never shrinks)."""
    if allowed >= covered(ranked, target):
        return target
    return max(current, min(target, ranked[allowed]))
