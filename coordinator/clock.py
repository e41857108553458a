"""The downtime clock and settling: pure, every time passed in.

Theory of operation. A wave's timeout counts only time the coordinator watched the
fleet. While connected it stores a heartbeat (:meth:`Heartbeat.due`); on every
connection :func:`resume` shifts every live wave by the gap since the last one, so
time spent down or disconnected never rolls a rollout back.

Right after a (re)connect the fleet view is partial: the retained device topics (20,000
messages at 10,000 devices, several seconds' worth) are still arriving. :class:`Settling`
says when it counts as complete, by a fence: once the device subscriptions of a
connection are acknowledged, the coordinator publishes a message it is itself
subscribed to (``topics.coordinator_fence()``, QoS 1, not retained) and waits for it to
come back through the one loop that handles every incoming message. Mosquitto queues
a subscription's retained messages for the subscriber while it handles the SUBSCRIBE,
before the SUBACK, and delivers one connection's QoS 1 messages in the order it queued
them; so the fence comes back only after every retained message of those subscriptions
(and, with a session kept, every message queued while the coordinator was away) was
handled. The fence names this process (a nonce: a kept session may still hold an earlier
process's fence) and counts its connections, so no older fence counts; it is sent again if it
did not come back in ``resend_s`` (a broker over its queue limit drops messages).
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
    shifted = tuple(_shifted(r, gap) for r in records if r.phase is Phase.WAVE)
    return Resumed(gap, shifted)


def _shifted(record: RolloutRecord, gap: float) -> RolloutRecord:
    """Every wave clock and pacing base of ``record`` ``gap`` seconds later."""
    lanes = {
        name: lane.model_copy(
            update={
                "entered_at": lane.entered_at + gap,
                "published_at": None if lane.published_at is None else lane.published_at + gap,
            }
        )
        for name, lane in record.lanes.items()
    }
    return record.model_copy(update={"lanes": lanes})


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
    """Whether the fleet view is complete: the fence of the connection the re-assert
    loop took came back (monotonic seconds)."""

    nonce: str
    """Different in every process: tells its fences from an earlier process's."""
    resend_s: float
    generation: int = 0
    links: int = 0
    """Connections taken so far: a new session starts its generations at 1 again."""
    sent_at: float | None = None
    """When the fence of ``generation`` was last sent; None while unlinked."""
    fenced: bool = False

    def linked(self, generation: int, now: float) -> bytes:
        """The re-assert loop took connection ``generation`` at ``now``, its device
        subscriptions acknowledged: the fence to publish."""
        self.generation, self.sent_at, self.fenced = generation, now, False
        self.links += 1
        return self.fence()

    def fence(self) -> bytes:
        return f"{self.nonce}/{self.links}".encode()

    def resend(self, now: float) -> bytes | None:
        """The fence to publish again, if it did not come back within ``resend_s``."""
        if self.sent_at is None or self.fenced or now - self.sent_at < self.resend_s:
            return None
        self.sent_at = now
        return self.fence()

    def came_back(self, payload: bytes) -> bool:
        """A fence arrived; whether the view became complete by it."""
        if self.sent_at is None or self.fenced or payload != self.fence():
            return False
        self.fenced = True
        return True

    def unlinked(self) -> None:
        self.sent_at, self.fenced = None, False

    def known(self, *, connected: bool, generation: int) -> bool:
        """Whether the view stands on a complete read of the retained device topics;
        a reconnect the re-assert loop has not caught up with is not settled."""
        return (
            self.fenced and self.sent_at is not None and connected and generation == self.generation
        )
