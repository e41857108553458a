"""The agent's named bounds: how much it remembers, how long a text it builds may be,
and how long a soak may run before it is judged anyway.

Frozen and keyword-only; :class:`agent.service.AgentConfig` carries one, so a deployment
changes a bound in one place and the engine, the intake and the services all read it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Limits"]


@dataclass(frozen=True, kw_only=True)
class Limits:
    known_good: int = 8
    """Releases remembered as having passed a soak here (swapped back in without one)."""
    failed: int = 32
    """Failed releases remembered, so that they are not tried again in their scope."""
    event_detail_chars: int = 2000
    event_reason_chars: int = 64
    rejection_detail_chars: int = 1000
    """The last rejection shown in the retained state."""
    storage_reason_chars: int = 200
    """One failing part of storage, as the state's ``degraded_reason`` tells it."""
    soak_deadline_factor: float = 3.0
    """A soak is judged at the latest after this many times its budgeted length (soak
    seconds, and the time ``min_inferences`` take at the configured rate) ..."""
    soak_grace_s: float = 5.0
    """... plus this: a model too slow to reach ``min_inferences`` is judged too."""
    max_batch: int = 64
    """The most rows that run through the model as one call (where it batches)."""
    max_waiting: int = 1024
    """The most inferences waiting for the model; more are refused (overloaded)."""
    inline_ms: float = 0.25
    """The most model time (estimated from the model's last call) run inline on the event
    loop in one turn, without a thread hop; more, a slower model or a busy worker thread
    go to the worker. 0 sends every inference to the worker."""

    def __post_init__(self) -> None:
        if min(self.known_good, self.failed, self.max_batch, self.max_waiting) < 1:
            msg = "need known_good, failed, max_batch and max_waiting >= 1"
            raise ValueError(msg)
        if self.inline_ms < 0:
            msg = "need inline_ms >= 0"
            raise ValueError(msg)
        if self.soak_deadline_factor < 1:
            msg = "need soak_deadline_factor >= 1"
            raise ValueError(msg)
