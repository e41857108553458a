"""One soak of a candidate, sans-IO: which model it counts, how, and until when.

Theory of operation. A candidate that loaded and passed its self-test soaks in one of two
ways, chosen by the update engine when the soak begins:

* **live**: swapped in, it answers every inference, and each one counts;
* **shadow** (its budget has ``shadow`` and a stable model serves): it runs beside the
  serving model on the same inputs, in the same batches, and never answers; its latency,
  its errors and whether its answers agree with the serving model's count.

Either way the soak is judged (:func:`agent.health.judge`) once it is ready (its soak
seconds passed and ``min_inferences`` are in) or at its deadline at the latest: a model
too slow to reach ``min_inferences`` is judged all the same, on too few inferences.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.events import Inferred
from agent.health import SoakStats, judge
from agent.limits import Limits
from schemas import Release, Verdict

__all__ = ["Soak"]


@dataclass
class Soak:
    release: Release
    stats: SoakStats
    deadline: float
    shadow: bool
    """Beside the serving model, never answering (else swapped in)."""

    @classmethod
    def begin(
        cls, release: Release, now: float, *, shadow: bool, inference_hz: float, limits: Limits
    ) -> Soak:
        """The soak of ``release`` from ``now``: its deadline allows ``soak_deadline_factor``
        times its length (soak seconds, and ``min_inferences`` at ``inference_hz``) plus
        ``soak_grace_s``."""
        budget = release.health
        length = budget.soak_seconds + budget.min_inferences / inference_hz
        deadline = now + length * limits.soak_deadline_factor + limits.soak_grace_s
        return cls(release, SoakStats(started=now), deadline, shadow)

    def count(self, event: Inferred) -> bool:
        """Count ``event`` if it is of this soak's model; whether the soak is ready to be
        judged now."""
        if event.sha256 != self.release.artifact.sha256:
            return False
        stats = self.stats
        stats.add(event.runs, event.errors)
        stats.compared += event.compared
        stats.agreed += event.agreed
        return stats.ready(self.release.health, event.now)

    def due(self, now: float) -> bool:
        """Past its deadline: judged now, ready or not."""
        return now >= self.deadline

    def judge(self) -> tuple[Verdict, tuple[str, ...]]:
        return judge(self.stats, self.release.health)
