"""The agent's update lifecycle, as one table.

Theory of operation: a device serves one model at all times once it has one. A new
target release is fetched and loaded *beside* the serving model; only a model that
loaded and passed its self-test is swapped in, and then soaked under live traffic (or,
when its budget asks for a shadow soak, soaked beside the serving model without answering,
and swapped in once healthy). A soak that fails its health budget swaps the previous model
back at once, without waiting for the coordinator. A newer target may supersede any stage
in flight.

    IDLE/SERVING/DEGRADED --target--> FETCHING --fetched--> LOADING --loaded--> SOAKING
    SOAKING --healthy--> SERVING        SOAKING --unhealthy--> DEGRADED (rolled back)
    FETCHING/LOADING --failed--> DEGRADED (or IDLE when there was no model)
    SOAKING --failed--> DEGRADED: the agent itself failed mid-soak; the previous model
        is back in service
    FETCHING/LOADING/SOAKING --superseded--> SERVING (IDLE without a model): the
        failure or update that was in flight no longer matters; the new target starts over
    IDLE/SERVING --crashed--> DEGRADED: at a start, a soak was found open (the candidate
        took the agent down); the previous model serves
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from schemas import Mode, UsageError

__all__ = ["IN_FLIGHT", "TRANSITIONS", "Stage", "Step", "advance"]


class Stage(StrEnum):
    IDLE = "idle"
    SERVING = "serving"
    FETCHING = "fetching"
    LOADING = "loading"
    SOAKING = "soaking"
    DEGRADED = "degraded"

    @property
    def mode(self) -> Mode:
        """The coarse mode published in DeviceState."""
        return _MODES[self]


class Step(StrEnum):
    TARGET = "target"
    FETCHED = "fetched"
    LOADED = "loaded"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    FAILED = "failed"
    SERVED = "served"
    """The target is already loaded and known good: swapped in without a soak."""
    SUPERSEDED = "superseded"
    CRASHED = "crashed"
    """Found at a start: the soak before it never ended."""


_MODES: Final = {
    Stage.IDLE: Mode.IDLE,
    Stage.SERVING: Mode.SERVING,
    Stage.FETCHING: Mode.UPDATING,
    Stage.LOADING: Mode.UPDATING,
    Stage.SOAKING: Mode.UPDATING,
    Stage.DEGRADED: Mode.DEGRADED,
}

_RESTING = (Stage.IDLE, Stage.SERVING, Stage.DEGRADED)
IN_FLIGHT: Final = (Stage.FETCHING, Stage.LOADING, Stage.SOAKING)
"""Stages of an update that a newer target may cut short."""

TRANSITIONS: Final[dict[tuple[Stage, Step], Stage]] = {
    **{(s, Step.TARGET): Stage.FETCHING for s in _RESTING},
    **{(s, Step.SERVED): Stage.SERVING for s in (*_RESTING, Stage.FETCHING)},
    (Stage.FETCHING, Step.FETCHED): Stage.LOADING,
    (Stage.LOADING, Step.LOADED): Stage.SOAKING,
    (Stage.SOAKING, Step.HEALTHY): Stage.SERVING,
    (Stage.SOAKING, Step.UNHEALTHY): Stage.DEGRADED,
    (Stage.FETCHING, Step.FAILED): Stage.DEGRADED,
    (Stage.LOADING, Step.FAILED): Stage.DEGRADED,
    (Stage.SOAKING, Step.FAILED): Stage.DEGRADED,
    **{(s, Step.SUPERSEDED): Stage.SERVING for s in IN_FLIGHT},
    **{(s, Step.CRASHED): Stage.DEGRADED for s in _RESTING},
}


def advance(stage: Stage, step: Step, *, has_model: bool) -> Stage:
    """The stage after ``step``.

    Raises:
        UsageError: ``step`` is not allowed in ``stage`` (a bug in the agent).
    """
    try:
        nxt = TRANSITIONS[(stage, step)]
    except KeyError:
        msg = f"no transition from {stage} on {step}"
        raise UsageError(msg) from None
    if nxt in (Stage.SERVING, Stage.DEGRADED) and not has_model:
        return Stage.IDLE
    return nxt
