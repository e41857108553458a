"""Which variant of a candidate each hardware class gets.

A rollout may carry several builds of one model (fp32, fp16, int8 with static or
dynamic quantisation). A class can take a variant when it fits the class profile:
within its size limit, of a precision it lists, with the declared inputs and outputs.
Of those, the class wants the first precision its profile lists, the smaller file on a
tie; the accuracy gate (in the coordinator, with data) then takes the first of that
order that passes.

A variant folder holds a build for every class there is, so a rollout to some classes
uses the variants that fit them and ignores the rest, saying which (``Ranking.ignored``).
Only a class that no variant fits refuses the rollout before anything is published.
The operator's pre-check and the coordinator's admission both rank with this one
function, so they agree on what a rollout uses. Pure: the facts are read beforehand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from coordinator.profiles import ClassProfile
from coordinator.validate import ModelFacts, problems_for_class
from schemas import Variant
from schemas.errors import bound_text

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
    used: tuple[Built, ...]
    """The variants that fit some class of the rollout, in the spec's order."""
    ignored: tuple[str, ...]
    """One line per variant that fits none of the rollout's classes, saying why."""
    problems: tuple[str, ...]
    """Why the rollout cannot go ahead; empty when every class has a variant."""


def rank_variants(
    built: Sequence[Built], profiles: Mapping[str, ClassProfile], classes: Sequence[str]
) -> Ranking:
    """Rank ``built`` for each of ``classes`` (every one a key of ``profiles``)."""
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
            problems.append(bound_text(f"no variant fits {name} ({' | '.join(refused)})"))
    used = tuple(b for b in built if len(misfits[b.variant.label]) < len(classes))
    ignored = tuple(
        bound_text(
            f"variant {b.variant.label} ({b.facts.precision}, {b.facts.size} B) fits no "
            f"class of the rollout: {' | '.join(misfits[b.variant.label])}"
        )
        for b in built
        if len(misfits[b.variant.label]) == len(classes)
    )
    return Ranking(order=order, used=used, ignored=ignored, problems=tuple(problems))
