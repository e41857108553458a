"""Which variant of a candidate each hardware class gets.

A rollout may carry several builds of one model (fp32, fp16, int8 with static or
dynamic quantisation). A class can take a variant when it fits the class profile:
within its size limit, of a precision it lists, with the declared inputs and outputs.
Of those, the class wants the first precision its profile lists, the smaller file on a
tie; the accuracy gate (in the coordinator, with data) then takes the first of that
order that passes. A variant that fits none of the rollout's classes, or a class that
no variant fits, refuses the whole rollout before anything is published: the operator
meant something else. Pure: the facts are read beforehand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from coordinator.profiles import ClassProfile
from coordinator.validate import ModelFacts, problems_for_class
from schemas import Variant

__all__ = ["Built", "Ranking", "rank_variants"]


@dataclass(frozen=True)
class Built:
    """A variant of the spec and what its model file turned out to be."""

    variant: Variant
    facts: ModelFacts


@dataclass(frozen=True)
class Ranking:
    order: dict[str, tuple[Built, ...]]
    """Class -> the variants that fit it, most wanted first."""
    problems: tuple[str, ...]
    """Why the rollout cannot go ahead; empty when every class has a variant and every
    variant a class."""


def rank_variants(
    built: Sequence[Built], profiles: Mapping[str, ClassProfile], classes: Sequence[str]
) -> Ranking:
    order: dict[str, tuple[Built, ...]] = {}
    misfits: dict[str, list[str]] = {b.variant.label: [] for b in built}
    problems: list[str] = []
    for name in classes:
        profile = profiles[name]
        fitting = []
        refused = []
        for b in built:
            why = problems_for_class(b.facts, b.variant, profile)
            if why:
                misfits[b.variant.label].append(f"{name}: {'; '.join(why)}")
                refused.append(f"{b.variant.label}: {'; '.join(why)}")
            else:
                fitting.append(b)
        fitting.sort(key=lambda b: (profile.precisions.index(b.facts.precision), b.facts.size))
        order[name] = tuple(fitting)
        if not fitting:
            problems.append(f"no variant fits {name} ({' | '.join(refused)})")
    for b in built:
        if len(misfits[b.variant.label]) == len(classes):
            problems.append(
                f"variant {b.variant.label} ({b.facts.precision}, {b.facts.size} B) fits no "
                f"class of the rollout: {' | '.join(misfits[b.variant.label])}"
            )
    return Ranking(order=order, problems=tuple(problems))
