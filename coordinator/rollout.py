"""The rollout state machine: waves per class, promotion, pause, abort and rollback.

Theory of operation. A rollout runs one *lane* per hardware class. Each lane moves the
class's candidate through the spec's waves on its own: its own cutoff, counts, clock
and verdict (:class:`Lane`). The rollout as a whole holds what the operator decides
(pause, resume, abort) and a phase derived from its lanes.

A lane enters a wave by fixing the wave's *target* cutoff (a percent of the buckets, or
the first ``count`` devices of the class by bucket: :mod:`coordinator.waves`). Its
published cutoff then climbs to the target at once, or at ``rate_per_min`` devices a
minute, and only while the class's maintenance window is open. The wave's clock starts
when the manifest carrying the target is on the wire (:func:`published`), not before.
Then, on the counts of a complete view of the fleet (:class:`schemas.WaveCounts`):

- it rolls back when ``(unhealthy + silent) / judged > max_failure_ratio``: a device
  targeted and then silent past the wave's silence limit counts as failed;
- it passes when ``healthy / targeted >= success_ratio`` and ``min_soak_s`` has passed;
  the last wave's pass completes the class (the candidate becomes its stable release),
  or, for an ``all_or_nothing`` rollout, waits for the other classes;
- an early wave with nobody to ask (no member online since its manifest went out) is
  passed over; the last wave never is;
- it rolls back when the wave outlives its timeout.

When a lane rolls back, only its class goes back, unless the spec says
``all_or_nothing``: then every class does. The rollout is final when every lane is:
completed if every one completed, else rolled back.

    WAVE --advance--> WAVE (next wave)    WAVE --complete--> COMPLETED
    WAVE --await_others--> PASSED (all_or_nothing) --complete--> COMPLETED
    WAVE/PASSED --roll_back--> ROLLED_BACK

Pure: no clock reads, no I/O, so the coordinator can replay it after a restart and
tests can drive it directly. Every decision but a wait says why, as a
:class:`coordinator.reasons.RolloutReason`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Final

from coordinator import waves
from coordinator.lanes import Lane, Policy, RolloutRecord
from coordinator.reasons import RolloutReason
from schemas import (
    Cause,
    Desired,
    LanePhase,
    Phase,
    UsageError,
    WaveCounts,
)
from schemas.errors import bound_text

__all__ = [
    "LANE_TRANSITIONS",
    "TRANSITIONS",
    "Action",
    "Change",
    "Lane",
    "LaneInput",
    "Policy",
    "RolloutRecord",
    "Step",
    "published",
    "step",
]


class Action(StrEnum):
    WAIT = "wait"
    ADVANCE = "advance"
    AWAIT_OTHERS = "await_others"
    COMPLETE = "complete"
    ROLL_BACK = "roll_back"
    PAUSE = "pause"
    RESUME = "resume"


TRANSITIONS: Final[dict[tuple[Phase, Action], Phase]] = {
    (Phase.WAVE, Action.WAIT): Phase.WAVE,
    (Phase.WAVE, Action.COMPLETE): Phase.COMPLETED,
    (Phase.WAVE, Action.ROLL_BACK): Phase.ROLLED_BACK,
    (Phase.WAVE, Action.PAUSE): Phase.PAUSED,
    (Phase.PAUSED, Action.WAIT): Phase.PAUSED,
    (Phase.PAUSED, Action.RESUME): Phase.WAVE,
    (Phase.PAUSED, Action.ROLL_BACK): Phase.ROLLED_BACK,
}
"""The rollout's own phase; lanes move by :data:`LANE_TRANSITIONS`."""

LANE_TRANSITIONS: Final[dict[tuple[LanePhase, Action], LanePhase]] = {
    (LanePhase.WAVE, Action.ADVANCE): LanePhase.WAVE,
    (LanePhase.WAVE, Action.AWAIT_OTHERS): LanePhase.PASSED,
    (LanePhase.WAVE, Action.COMPLETE): LanePhase.COMPLETED,
    (LanePhase.WAVE, Action.ROLL_BACK): LanePhase.ROLLED_BACK,
    (LanePhase.PASSED, Action.COMPLETE): LanePhase.COMPLETED,
    (LanePhase.PASSED, Action.ROLL_BACK): LanePhase.ROLLED_BACK,
}


@dataclass(frozen=True)
class LaneInput:
    """What the fleet view says of one class of a rollout now."""

    counts: WaveCounts
    ranked: Sequence[int] = ()
    """The buckets of the class's known devices, sorted: for count waves and pacing."""
    unhealthy: Callable[[], Sequence[str]] = tuple
    """The devices' own words (``device: reasons``) that a rollback quotes."""


@dataclass(frozen=True)
class Change:
    """One decision of a tick: of a class, or of the whole rollout (``name`` None)."""

    name: str | None
    action: Action
    reason: RolloutReason | None

    def text(self, record: RolloutRecord) -> str:
        """The reason as the record, the status and the audit log say it: named by its
        class when the rollout has several."""
        said = "" if self.reason is None else str(self.reason)
        if self.name is None or len(record.classes) == 1:
            return said
        return f"{self.name}: {said}" if said else self.name


@dataclass(frozen=True)
class Step:
    """One tick of one rollout: what was decided and the record after it."""

    record: RolloutRecord
    changes: tuple[Change, ...] = ()
    """What to audit."""
    promoted: tuple[str, ...] = ()
    """Classes whose candidate became their stable release in this step."""
    moved: bool = False
    """A cutoff or a wave clock moved: the record is stored before any manifest shows it
    (a restart must never shrink a wave)."""

    @property
    def transition(self) -> bool:
        """Whether the record is to be stored; otherwise only the counts the status
        shows changed."""
        return bool(self.changes) or self.moved


@dataclass
class _Tick:
    """A step being built."""

    record: RolloutRecord
    now: float
    reason_chars: int
    lanes: dict[str, Lane] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)

    def lane_to(self, name: str, action: Action, reason: RolloutReason | None) -> None:
        lane = self.lanes[name]
        try:
            phase = LANE_TRANSITIONS[(lane.phase, action)]
        except KeyError:
            msg = f"rollout {self.record.id}, {name}: no transition from {lane.phase} on {action}"
            raise UsageError(msg) from None
        if reason is not None:
            reason = replace(reason, chars=self.reason_chars)
        update: dict[str, object] = {"phase": phase}
        if reason is not None:
            update.update(reason=str(reason), cause=reason.cause)
        self.lanes[name] = lane.model_copy(update=update)
        self.changes.append(Change(name, action, reason))


def step(
    record: RolloutRecord,
    inputs: Mapping[str, LaneInput],
    now: float,
    *,
    fleet_known: bool,
    reason_chars: int,
) -> Step | None:
    """Decide on ``record`` given what the fleet view says of each class; None when
    nothing changed. Until ``fleet_known`` (a complete view of the fleet), the counts
    may show a few reports out of many: only the operator's wishes act on them."""
    tick = _Tick(record, now, reason_chars, lanes=dict(record.lanes))
    for name, given in inputs.items():
        lane = tick.lanes.get(name)
        if lane is not None and lane.live:
            tick.lanes[name] = lane.model_copy(update={"counts": given.counts})
    if not _wish(tick) and record.phase is Phase.WAVE and fleet_known:
        for name, lane in record.lanes.items():
            if lane.phase is LanePhase.WAVE and name in inputs:
                _lane(tick, name, inputs[name])
        _together(tick)
    return _finish(tick)


def _wish(tick: _Tick) -> bool:
    """Carry out what the operator's desired state decides on its own; whether it did."""
    record, now = tick.record, tick.now
    if record.desired is Desired.ABORTED and not record.phase.final:
        reason = RolloutReason(cause=Cause.OPERATOR_ABORT)
        for name, lane in record.lanes.items():
            if lane.live:
                tick.lane_to(name, Action.ROLL_BACK, reason)
        tick.changes.append(Change(None, Action.ROLL_BACK, reason))
        return True
    if record.phase is Phase.PAUSED:
        if record.desired is Desired.ACTIVE:
            for name, lane in record.lanes.items():
                tick.lanes[name] = lane.model_copy(
                    update={
                        "entered_at": now,
                        "published_at": None if lane.published_at is None else now,
                    }
                )
            tick.changes.append(Change(None, Action.RESUME, None))
        return True
    if record.desired is Desired.PAUSED and record.phase is Phase.WAVE:
        tick.changes.append(Change(None, Action.PAUSE, RolloutReason(cause=Cause.OPERATOR_PAUSE)))
        return True
    return False


def _lane(tick: _Tick, name: str, given: LaneInput) -> None:
    """One class's wave: enter it, raise its cutoff, judge it."""
    record, now = tick.record, tick.now
    lane = tick.lanes[name]
    if lane.target_bp is None:
        lane = _enter(record, lane, lane.wave, given.ranked, now)
    lane = _raise(record, name, lane, given.ranked, now)
    tick.lanes[name] = lane
    action, cause = _judge(record, lane, given.counts, now)
    if cause is None:
        return
    counts = given.counts
    reason = RolloutReason(cause=cause, wave=lane.wave, counts=counts)
    if action is Action.ROLL_BACK and counts.unhealthy:
        reason = replace(reason, quoted=tuple(given.unhealthy()))
    if action is Action.ADVANCE:
        tick.lane_to(name, action, reason)
        tick.lanes[name] = _raise(
            record,
            name,
            _enter(record, tick.lanes[name], lane.wave + 1, given.ranked, now),
            given.ranked,
            now,
        )
    elif action is Action.COMPLETE and record.all_or_nothing:
        tick.lane_to(name, Action.AWAIT_OTHERS, reason)
    else:
        tick.lane_to(name, action, reason)


def _enter(record: RolloutRecord, lane: Lane, wave: int, ranked: Sequence[int], now: float) -> Lane:
    """``lane`` entering ``wave``: its target fixed, its clock not started yet."""
    target = waves.wave_cutoff(record.waves[wave], ranked)
    return lane.model_copy(
        update={
            "wave": wave,
            "target_bp": max(target, lane.target_bp or 0, lane.cutoff_bp),
            "entered_at": now,
            "entered_covered": waves.covered(ranked, lane.cutoff_bp),
            "published_at": None,
            "counts": WaveCounts(),
        }
    )


def _raise(record: RolloutRecord, name: str, lane: Lane, ranked: Sequence[int], now: float) -> Lane:
    """``lane`` with its cutoff raised as far as its pace and window allow now."""
    target = lane.target_bp
    if target is None or lane.cutoff_bp >= target:
        return lane if lane.waiting is None else lane.model_copy(update={"waiting": None})
    window = record.windows.get(name)
    if window is not None and not window.open_at(now):
        return lane.model_copy(update={"waiting": f"outside its maintenance window {window}"})
    cutoff, waiting = target, None
    if record.rate_per_min is not None:
        elapsed = max(0.0, now - lane.entered_at)
        allowed = lane.entered_covered + int(record.rate_per_min * elapsed / 60.0)
        cutoff = waves.paced_cutoff(ranked, current=lane.cutoff_bp, target=target, allowed=allowed)
        if cutoff < target:
            reached, total = waves.covered(ranked, cutoff), waves.covered(ranked, target)
            waiting = f"paced at {record.rate_per_min}/min: {reached} of {total} devices reached"
    return lane.model_copy(update={"cutoff_bp": cutoff, "waiting": waiting})


def _judge(
    record: RolloutRecord, lane: Lane, counts: WaveCounts, now: float
) -> tuple[Action, Cause | None]:
    """A wave's verdict on the counts of a complete view of the fleet."""
    policy = lane.policy.for_wave(record.waves[lane.wave])
    last = lane.wave == len(record.waves) - 1
    if counts.judged and counts.failed / counts.judged > policy.max_failure_ratio:
        return Action.ROLL_BACK, (Cause.UNHEALTHY if counts.unhealthy else Cause.SILENT)
    if lane.published_at is None:
        return Action.WAIT, None  # the wave's manifest is not out yet: its clock has not started
    age = now - lane.published_at
    # Divide rather than multiply: 55 / 100 >= 0.55 holds, 55 >= 0.55 * 100 does not.
    if counts.targeted and counts.healthy / counts.targeted >= policy.success_ratio:
        soaked = age >= policy.min_soak_s
        return (Action.COMPLETE if last else Action.ADVANCE) if soaked else Action.WAIT, (
            Cause.PROMOTED if soaked else None
        )
    if counts.targeted == 0 and not last:
        # Nobody to ask: no member was online since the wave's manifest went out. The
        # last wave never passes so, and a candidate is never promoted on no evidence.
        return Action.ADVANCE, Cause.EMPTY_WAVE
    if age > policy.timeout_s:
        return Action.ROLL_BACK, Cause.TIMED_OUT
    return Action.WAIT, None


def _together(tick: _Tick) -> None:
    """An ``all_or_nothing`` rollout: one class rolled back takes the others with it;
    once every class passed, all complete."""
    if not tick.record.all_or_nothing:
        return
    lanes = tick.lanes
    if any(lane.phase is LanePhase.ROLLED_BACK for lane in lanes.values()):
        reason = RolloutReason(cause=Cause.OTHER_CLASS_FAILED)
        for name, lane in lanes.items():
            if lane.live:
                tick.lane_to(name, Action.ROLL_BACK, reason)
    elif all(lane.phase is LanePhase.PASSED for lane in lanes.values()):
        for name in lanes:
            tick.lane_to(name, Action.COMPLETE, None)


def _finish(tick: _Tick) -> Step | None:
    """The record after the tick's changes, and the rollout's phase and reason."""
    record, now = tick.record, tick.now
    update: dict[str, object] = {"lanes": tick.lanes}
    phase = record.phase
    for change in tick.changes:
        if change.name is None and change.action in (Action.PAUSE, Action.RESUME):
            phase = TRANSITIONS[(phase, change.action)]
            update["started"] = record.started or change.action is Action.RESUME
    if phase in (Phase.WAVE, Phase.PAUSED) and not any(lane.live for lane in tick.lanes.values()):
        every = all(lane.phase is LanePhase.COMPLETED for lane in tick.lanes.values())
        phase = Phase.COMPLETED if every else Phase.ROLLED_BACK
    update["phase"] = phase
    said = [(c, c.reason) for c in tick.changes if c.reason is not None]
    if said:
        last, reason = said[-1]
        update.update(reason=bound_text(last.text(record), tick.reason_chars), cause=reason.cause)
    after = record.model_copy(update=update)
    if not tick.changes and after.lanes == record.lanes:
        return None
    promoted = tuple(
        c.name for c in tick.changes if c.name is not None and c.action is Action.COMPLETE
    )
    moved = any(_moving(lane) != _moving(record.lanes[name]) for name, lane in after.lanes.items())
    return Step(
        after.model_copy(update={"updated_at": now}), tuple(tick.changes), promoted, moved=moved
    )


def _moving(lane: Lane) -> tuple[object, ...]:
    """What of a lane must be stored when it changes: all but its counts and waiting."""
    return (lane.phase, lane.wave, lane.target_bp, lane.cutoff_bp, lane.published_at)


def published(record: RolloutRecord, now: float) -> RolloutRecord | None:
    """The record once the manifests carrying its lanes' targets are on the wire: each
    such lane's wave clock starts now. None when no clock started."""
    if record.phase is not Phase.WAVE:
        return None
    lanes = dict(record.lanes)
    for name, lane in record.lanes.items():
        if (
            lane.phase is LanePhase.WAVE
            and lane.published_at is None
            and lane.target_bp is not None
            and lane.cutoff_bp >= lane.target_bp
        ):
            lanes[name] = lane.model_copy(update={"published_at": now})
    if lanes == record.lanes:
        return None
    return record.model_copy(update={"lanes": lanes, "updated_at": now})
