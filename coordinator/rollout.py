"""The rollout state machine: waves, promotion, pause, abort and rollback.

Theory of operation. A rollout moves its candidate through waves of increasing
``cutoff_bp``. The coordinator feeds it the counts it observes for the current wave
(devices targeted, updated, healthy, unhealthy) and the operator's desired state, and
applies the transition :func:`decide` returns. Everything here is pure: no clock
reads, no I/O, so the coordinator can replay it after a restart and tests can drive
it directly.

    WAVE --advance--> WAVE (next cutoff)      WAVE --complete--> COMPLETED (stable := candidate)
    WAVE --roll_back--> ROLLED_BACK           WAVE/--pause--> PAUSED --resume--> WAVE
    PAUSED --roll_back--> ROLLED_BACK         (validation failure: REJECTED before any wave)

A wave advances when ``healthy >= success_ratio * targeted`` (and someone was
targeted); it rolls back when ``unhealthy / reported > max_failure_ratio`` or when the
wave outlives its timeout. None of these is decided on counts from an incomplete view of
the fleet (right after a (re)start or reconnect): until then only the operator's pause,
resume and abort act. A rollout admitted paused has not ``started``: no manifest carries
it until it is resumed. Every decision but a wait or a resume says why, as a
:class:`coordinator.reasons.RolloutReason` (a cause with its wave and counts): the record
keeps its text and its cause, which the status publishes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Final

from pydantic import BaseModel, ConfigDict

from coordinator.reasons import RolloutReason
from schemas import Cause, Desired, Phase, Release, UsageError, WaveCounts
from schemas.manifest import BUCKETS as BUCKETS_ALL

__all__ = ["TRANSITIONS", "Action", "RolloutRecord", "Step", "apply", "cutoff_bp", "decide", "step"]


class Action(StrEnum):
    WAIT = "wait"
    ADVANCE = "advance"
    COMPLETE = "complete"
    ROLL_BACK = "roll_back"
    PAUSE = "pause"
    RESUME = "resume"


TRANSITIONS: Final[dict[tuple[Phase, Action], Phase]] = {
    (Phase.WAVE, Action.WAIT): Phase.WAVE,
    (Phase.WAVE, Action.ADVANCE): Phase.WAVE,
    (Phase.WAVE, Action.COMPLETE): Phase.COMPLETED,
    (Phase.WAVE, Action.ROLL_BACK): Phase.ROLLED_BACK,
    (Phase.WAVE, Action.PAUSE): Phase.PAUSED,
    (Phase.PAUSED, Action.WAIT): Phase.PAUSED,
    (Phase.PAUSED, Action.RESUME): Phase.WAVE,
    (Phase.PAUSED, Action.ROLL_BACK): Phase.ROLLED_BACK,
}


class RolloutRecord(BaseModel):
    """A rollout as the coordinator's store keeps it."""

    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    id: str
    generation: int
    spec: bytes
    """The operator-signed spec bytes, kept for audit."""
    classes: tuple[str, ...]
    candidates: dict[str, Release]
    waves_percent: tuple[float, ...]
    canaries: tuple[str, ...]
    success_ratio: float
    max_failure_ratio: float
    wave_timeout_s: float
    desired: Desired = Desired.ACTIVE
    phase: Phase
    wave: int
    wave_started_at: float
    counts: WaveCounts = WaveCounts()
    reason: str | None = None
    """The text of the last reason recorded, as the status shows it."""
    cause: Cause | None = None
    """Its cause; None in records stored before causes were (their text stands alone)."""
    updated_at: float
    started: bool = True
    """False while a rollout admitted paused has not yet been resumed: no manifest
    carries it before then."""

    @property
    def release_id(self) -> str:
        return next(iter(self.candidates.values())).release_id


def cutoff_bp(record: RolloutRecord) -> int:
    """Bucket cutoff of the current wave (the last wave's once completed)."""
    index = min(record.wave, len(record.waves_percent) - 1)
    # Rounded before ceil: 0.07 % is 7 buckets, though 0.07 * 10000 / 100 is 7.000000000000001.
    buckets = round(record.waves_percent[index] * BUCKETS_ALL / 100.0, 6)
    return min(BUCKETS_ALL, math.ceil(buckets))


def decide(
    record: RolloutRecord,
    counts: WaveCounts,
    desired: Desired,
    now: float,
    *,
    fleet_known: bool = True,
) -> tuple[Action, RolloutReason | None]:
    """What to do next, and why (for the status and the audit log).

    ``fleet_known`` says the counts stand on a complete view of the fleet (the
    coordinator has had time to read the retained device topics). Until it does, the
    counts may show a few reports out of many, so no promotion, failure rollback, pass
    over an empty wave or timeout is decided on them: only the operator's wishes act.
    """
    wish = _wish(record.phase, desired)
    if wish is not None:
        return wish
    if not fleet_known:
        return Action.WAIT, None
    return _judge(record, counts, now)


def _wish(phase: Phase, desired: Desired) -> tuple[Action, RolloutReason | None] | None:
    """What the operator's desired state decides on its own, if anything."""
    if desired is Desired.ABORTED:
        return Action.ROLL_BACK, RolloutReason(cause=Cause.OPERATOR_ABORT)
    if phase is Phase.PAUSED:
        return (Action.RESUME, None) if desired is Desired.ACTIVE else (Action.WAIT, None)
    if desired is Desired.PAUSED:
        return Action.PAUSE, RolloutReason(cause=Cause.OPERATOR_PAUSE)
    return None


def _judge(
    record: RolloutRecord, counts: WaveCounts, now: float
) -> tuple[Action, RolloutReason | None]:
    """A wave's verdict on the counts of a complete view of the fleet."""
    last = record.wave == len(record.waves_percent) - 1
    action, cause = Action.WAIT, None
    if counts.reported and counts.unhealthy / counts.reported > record.max_failure_ratio:
        action, cause = Action.ROLL_BACK, Cause.UNHEALTHY
    # Divide rather than multiply: 55 / 100 >= 0.55 holds, 55 >= 0.55 * 100 does not.
    elif counts.targeted and counts.healthy / counts.targeted >= record.success_ratio:
        action, cause = (Action.COMPLETE if last else Action.ADVANCE), Cause.PROMOTED
    elif counts.members == 0 and counts.targeted == 0 and not last:
        # A small fleet's early wave can hold no device: nothing to wait for. The last
        # wave never passes empty, so a candidate is never promoted on no evidence.
        action, cause = Action.ADVANCE, Cause.EMPTY_WAVE
    elif now - record.wave_started_at > record.wave_timeout_s:
        action, cause = Action.ROLL_BACK, Cause.TIMED_OUT
    if cause is None:
        return action, None
    return action, RolloutReason(cause=cause, wave=record.wave, counts=counts)


def apply(
    record: RolloutRecord,
    action: Action,
    reason: RolloutReason | None,
    counts: WaveCounts,
    now: float,
) -> RolloutRecord:
    """The record after ``action``.

    Raises:
        UsageError: the action is not allowed in the record's phase.
    """
    try:
        phase = TRANSITIONS[(record.phase, action)]
    except KeyError:
        msg = f"rollout {record.id}: no transition from {record.phase} on {action}"
        raise UsageError(msg) from None
    changes: dict[str, object] = {"phase": phase, "counts": counts, "updated_at": now}
    if reason is not None:
        changes.update(reason=str(reason), cause=reason.cause)
    if action is Action.ADVANCE:
        changes.update(wave=record.wave + 1, wave_started_at=now, counts=WaveCounts())
    elif action is Action.COMPLETE:
        changes["wave"] = len(record.waves_percent)
    elif action is Action.RESUME:
        changes.update(wave_started_at=now, started=True)
    return record.model_copy(update=changes)


@dataclass(frozen=True)
class Step:
    """One tick of one rollout: what was decided and the record after it."""

    action: Action
    record: RolloutRecord
    reason: RolloutReason | None

    @property
    def transition(self) -> bool:
        """Whether the record is to be stored (and audited); a wait only refreshes the
        counts the status shows."""
        return self.action is not Action.WAIT


def step(
    record: RolloutRecord,
    counts: WaveCounts,
    now: float,
    *,
    fleet_known: bool,
    unhealthy: Callable[[], Sequence[str]],
    reason_chars: int,
) -> Step | None:
    """Decide on ``record`` given the counts of its wave; None when nothing changed.

    ``unhealthy`` gives the devices' own words (``device: reasons``) that a rollback
    quotes when some are unhealthy; the reason's text is bounded to ``reason_chars``.
    """
    action, reason = decide(record, counts, record.desired, now, fleet_known=fleet_known)
    if action is Action.WAIT:
        if counts == record.counts:
            return None
        return Step(action, record.model_copy(update={"counts": counts, "updated_at": now}), None)
    if reason is not None:
        quoted = tuple(unhealthy()) if action is Action.ROLL_BACK and counts.unhealthy else ()
        reason = replace(reason, quoted=quoted, chars=reason_chars)
    return Step(action, apply(record, action, reason, counts, now), reason)
