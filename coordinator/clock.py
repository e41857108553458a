"""The downtime clock and settling: pure, every time passed in.

Theory of operation. A wave's timeout counts only time the coordinator watched the
fleet. While connected it stores a heartbeat (:meth:`Heartbeat.due`); on every
connection :func:`resume` shifts every live wave by the gap since the last one, so
time spent down or disconnected never rolls a rollout back. Right after a
(re)connect the fleet view is partial: the retained device topics are still arriving.
:class:`Settling` says when it counts as complete — ``settle_s`` after the link the
re-assert loop caught up with, and only while that very link is still up.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from coordinator.rollout import RolloutRecord
from schemas import Phase

__all__ = ["Heartbeat", "Resumed", "Settling", "resume"]


@dataclass(frozen=True)
class Resumed:
    """What a resume after ``gap`` seconds unobserved changes."""

    gap: float
    shifted: tuple[RolloutRecord, ...]
    """The live rollouts with their waves started ``gap`` later, to store."""


def resume(records: Iterable[RolloutRecord], last_beat: float | None, now: float) -> Resumed:
    """Shift every rollout in a wave by the time since ``last_beat`` (none on a first
    start, or when the wall clock went back)."""
    if last_beat is None or now <= last_beat:
        return Resumed(0.0, ())
    gap = now - last_beat
    shifted = tuple(
        r.model_copy(update={"wave_started_at": r.wave_started_at + gap})
        for r in records
        if r.phase is Phase.WAVE
    )
    return Resumed(gap, shifted)


@dataclass
class Heartbeat:
    """When the store next learns that the coordinator still watches."""

    every_s: float
    last: float = 0.0

    def due(self, now: float, *, watching: bool) -> bool:
        """Whether to store a beat at ``now``; only while the fleet view is complete."""
        return watching and now - self.last >= self.every_s

    def beat(self, now: float) -> None:
        self.last = now


@dataclass
class Settling:
    """Whether the fleet view is complete: ``settle_s`` after the connection the
    re-assert loop caught up with (monotonic seconds)."""

    settle_s: float
    linked_at: float | None = None
    generation: int = 0

    def linked(self, generation: int, now: float) -> None:
        """The re-assert loop took connection ``generation`` at ``now``."""
        self.linked_at, self.generation = now, generation

    def unlinked(self) -> None:
        self.linked_at = None

    def known(self, now: float, *, connected: bool, generation: int) -> bool:
        """Whether the view stands on a complete read of the retained device topics;
        a reconnect the re-assert loop has not caught up with is not settled."""
        return (
            self.linked_at is not None
            and connected
            and generation == self.generation
            and now - self.linked_at >= self.settle_s
        )
