"""How simulated devices (:mod:`edgefleet.sim`) behave: their configuration, and which
of them are unhealthy or silent."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from agent.link import STATE_SETTLE_S
from schemas import bucket
from schemas.manifest import BUCKETS

__all__ = ["Behaviour", "SimConfig"]

_BEHAVIOUR_SALT: Final = "edgefleet-sim/behaviour"


class Behaviour(StrEnum):
    """How a simulated device fares on a new release."""

    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    """Reports unhealthy (error rate and latency over budget) and goes back."""
    SILENT = "silent"
    """Takes the manifest, names the release its target and never reports again."""


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    """How every simulated device behaves."""

    soak_s: float | None = None
    """Seconds between taking a release and reporting on it; None: the release's own
    ``health.soak_seconds``."""
    unhealthy_fraction: float = 0.0
    silent_fraction: float = 0.0
    """Shares of the devices that are unhealthy / silent on every new release (disjoint:
    a device is unhealthy first)."""
    telemetry_s: float = 0.0
    """Period of telemetry windows besides the one of each soak; 0: none."""
    inference_hz: float = 20.0
    """Simulated inferences per second (counts in state, reports and telemetry)."""
    latency_ms: float = 2.0
    """Simulated latency of a healthy device's inferences."""
    state_settle_s: float = STATE_SETTLE_S
    """How long a changed state waits for the changes that follow it (as an agent's)."""
    state_interval_s: float = 0.0
    """Period of the state published for liveness besides changes (an agent's is 5 s);
    0: only on changes."""
    keepalive: int = 60
    connect_timeout: float = 60.0

    def __post_init__(self) -> None:
        shares = (self.unhealthy_fraction, self.silent_fraction)
        if not all(0.0 <= share <= 1.0 for share in shares) or sum(shares) > 1.0:
            msg = "unhealthy and silent fractions must be in [0, 1] and add up to at most 1"
            raise ValueError(msg)
        periods = (self.telemetry_s, self.state_settle_s, self.state_interval_s)
        if (self.soak_s is not None and self.soak_s < 0) or min(periods) < 0:
            msg = "soak, telemetry and state periods must not be negative"
            raise ValueError(msg)
        if self.inference_hz <= 0 or self.latency_ms <= 0:
            msg = "inference rate and latency must be positive"
            raise ValueError(msg)

    def behaviour(self, device_id: str) -> Behaviour:
        """A device's behaviour, from a stable hash of its id."""
        # One hash for both shares: the silent ones come right after the unhealthy ones.
        place = bucket(_BEHAVIOUR_SALT, device_id)
        if place < self.unhealthy_fraction * BUCKETS:
            return Behaviour.UNHEALTHY
        if place < (self.unhealthy_fraction + self.silent_fraction) * BUCKETS:
            return Behaviour.SILENT
        return Behaviour.HEALTHY
