"""The one reconnect policy of the project: exponential backoff with jitter.

Every party that keeps a link to the broker (the session's own reconnects, an agent's or
the coordinator's link when the broker was unreachable at start) draws its delays from a
:class:`Backoff`, so that a fleet of thousands that lost its broker does not come back in
lockstep, and so that the policy is configured in one place: :data:`RECONNECT`.

Pure: the caller sleeps, and passes a random source in tests.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["RECONNECT", "Backoff", "Retry"]


@dataclass(frozen=True, kw_only=True)
class Backoff:
    """Delays ``initial · factor^n``, capped at ``maximum``, each drawn uniformly from
    ``[(1 - jitter) · d, d]``. A link that stayed up ``reset_after`` seconds starts over."""

    initial: float = 0.2
    maximum: float = 5.0
    factor: float = 2.0
    jitter: float = 0.5
    reset_after: float = 30.0

    def __post_init__(self) -> None:
        if not (0 < self.initial <= self.maximum and self.factor >= 1 and 0 <= self.jitter <= 1):
            msg = "need 0 < initial <= maximum, factor >= 1 and 0 <= jitter <= 1"
            raise ValueError(msg)

    def ceiling(self, attempt: int) -> float:
        """The delay before jitter after ``attempt`` failures in a row (0: the first)."""
        return min(self.initial * self.factor ** min(attempt, 64), self.maximum)


_JITTER = random.Random()  # noqa: S311 (jitter, not a secret)
"""The jitter's own generator: the global one's state stays the application's (and a
property test's, which watches it)."""

RECONNECT = Backoff()
"""The project's reconnect policy: 0.2 s doubling to 5 s, half of each delay jittered."""


@dataclass
class Retry:
    """One link's place in a :class:`Backoff`: how many attempts failed in a row."""

    policy: Backoff = RECONNECT
    rand: Callable[[], float] = field(default=_JITTER.random, repr=False)
    failures: int = 0

    def next_delay(self) -> float:
        """The delay before the next attempt; counts one more failure."""
        ceiling = self.policy.ceiling(self.failures)
        self.failures += 1
        return ceiling * (1 - self.policy.jitter * self.rand())

    def linked(self, seconds: float) -> None:
        """A link stayed up ``seconds``: long enough, and the next failure starts over."""
        if seconds >= self.policy.reset_after:
            self.failures = 0

    def reset(self) -> None:
        """Start over from ``initial``."""
        self.failures = 0
