"""Spec admission as a table: what the coordinator does with rollout spec bytes.

Theory of operation. Spec bytes arriving on ``rollouts/{id}/spec`` are first read
(:func:`read`): the coordinator's own bytes, a cleared topic, bytes that fail
verification (or another rollout's spec replayed under this id), or a verified spec
that is active/paused or aborted. What the coordinator holds of the id is its
:class:`Standing`: a rollout record (and how the spec's generation compares with it),
a refusal of alike bytes, a spec of it being validated, a retained status saying this
generation already ended (a new or lost store), classes that conflict, or nothing.
:data:`TABLE` maps the pair to one :class:`Verdict`, which the intake service carries
out; every pair :func:`standing` can produce has a row.

    standing \\ bytes   own     cleared   invalid   active     aborted
    record             ignore  reassert  reassert
    older                                          reassert   reassert
    same                                           republish  republish
    newer                                          new gen    new gen
    refused                              ignore
    validating                                     hold       hold
    finished                                       finished   finished
    conflict                                       reject     aborted
    none                       ignore    refuse    admit      aborted

A verified spec is admitted in two steps: :data:`Verdict.ADMIT` reserves its classes
(the validation runs outside the lock), then :func:`admitted_phase` decides the phase
from the validation's refusal and the newest generation held meanwhile.
Pure: no clock, store or broker; ``now`` is passed in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from coordinator.profiles import ClassProfile, class_policy
from coordinator.reasons import RolloutReason
from coordinator.rollout import Lane, RolloutRecord
from coordinator.store import Refusal
from schemas import (
    Cause,
    Desired,
    LanePhase,
    Phase,
    Reason,
    RejectedError,
    Release,
    RolloutSpec,
    RolloutStatus,
    TrustedState,
    decode,
)

__all__ = [
    "TABLE",
    "Arrival",
    "Claim",
    "Kind",
    "Problem",
    "Standing",
    "Verdict",
    "admitted_phase",
    "claim_problems",
    "digest",
    "finished_record",
    "new_generation",
    "new_record",
    "read",
    "refusals_to_forget",
    "retained_status",
    "retained_waves",
    "standing",
]


def digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


class Kind(StrEnum):
    """What spec bytes are, once read."""

    OWN = "own"
    """The bytes of the record acted on (re-asserted, or redelivered)."""
    CLEARED = "cleared"
    INVALID = "invalid"
    """Failed verification, or another rollout's spec replayed under this id."""
    ACTIVE = "active"
    """Verified; desired active or paused."""
    ABORTED = "aborted"
    """Verified; desired aborted."""


class Standing(StrEnum):
    """What the coordinator holds of the rollout id."""

    RECORD = "record"
    OLDER = "older"
    """A record of a newer generation than the spec's."""
    SAME = "same"
    NEWER = "newer"
    """The spec is a newer generation than the record."""
    REFUSED = "refused"
    """A refusal of the same bytes, or for the same reason: reported once."""
    VALIDATING = "validating"
    FINISHED = "finished"
    """No record, but the retained status says this generation already ended."""
    CONFLICT = "conflict"
    """Unknown classes, or classes in another live rollout."""
    NONE = "none"


class Verdict(StrEnum):
    IGNORE = "ignore"
    REASSERT = "reassert"
    """Put the record's spec back: the broker's cache is wrong."""
    REFUSE = "refuse"
    """Store and publish a ``rejected`` status; forget the oldest refusals beyond the limit."""
    REPUBLISH = "republish"
    """Nothing to store; the status is published again."""
    NEW_GENERATION = "new_generation"
    HOLD = "hold"
    """Keep the newest generation until the one being validated is admitted."""
    FINISHED = "finished"
    """Record the rollout as its retained status says it ended; never admit it again."""
    ABORTED = "aborted"
    """Record it rolled back before admission: never validated, no manifest names it."""
    REJECT = "reject"
    ADMIT = "admit"


TABLE: Final[dict[tuple[Kind, Standing], Verdict]] = {
    (Kind.OWN, Standing.RECORD): Verdict.IGNORE,
    (Kind.CLEARED, Standing.RECORD): Verdict.REASSERT,
    (Kind.CLEARED, Standing.NONE): Verdict.IGNORE,
    (Kind.INVALID, Standing.RECORD): Verdict.REASSERT,
    (Kind.INVALID, Standing.REFUSED): Verdict.IGNORE,
    (Kind.INVALID, Standing.NONE): Verdict.REFUSE,
    (Kind.ACTIVE, Standing.OLDER): Verdict.REASSERT,
    (Kind.ACTIVE, Standing.SAME): Verdict.REPUBLISH,
    (Kind.ACTIVE, Standing.NEWER): Verdict.NEW_GENERATION,
    (Kind.ACTIVE, Standing.VALIDATING): Verdict.HOLD,
    (Kind.ACTIVE, Standing.FINISHED): Verdict.FINISHED,
    (Kind.ACTIVE, Standing.CONFLICT): Verdict.REJECT,
    (Kind.ACTIVE, Standing.NONE): Verdict.ADMIT,
    (Kind.ABORTED, Standing.OLDER): Verdict.REASSERT,
    (Kind.ABORTED, Standing.SAME): Verdict.REPUBLISH,
    (Kind.ABORTED, Standing.NEWER): Verdict.NEW_GENERATION,
    (Kind.ABORTED, Standing.VALIDATING): Verdict.HOLD,
    (Kind.ABORTED, Standing.FINISHED): Verdict.FINISHED,
    (Kind.ABORTED, Standing.CONFLICT): Verdict.ABORTED,
    (Kind.ABORTED, Standing.NONE): Verdict.ABORTED,
}


@dataclass(frozen=True)
class Problem:
    """Why spec bytes cannot be acted on: a machine-readable reason and bounded text."""

    reason: Reason | None
    """None for a cleared topic (nothing was rejected)."""
    detail: str

    def text(self, limit: int) -> str:
        """The refusal as stored and published (its cause: ``spec_refused``)."""
        return str(RolloutReason(cause=Cause.SPEC_REFUSED, problems=(self.detail,), chars=limit))


@dataclass(frozen=True)
class Arrival:
    """Spec bytes as read."""

    rollout_id: str
    payload: bytes
    kind: Kind
    spec: RolloutSpec | None = None
    """The verified spec (``ACTIVE`` and ``ABORTED``)."""
    problem: Problem | None = None
    """Why not (``CLEARED`` and ``INVALID``)."""


def read(
    trusted: TrustedState, rollout_id: str, payload: bytes, own: bytes | None, now: float
) -> Arrival:
    """Read spec bytes for ``rollout_id``; ``own`` the bytes of its record, if any."""
    if own is not None and payload == own:
        return Arrival(rollout_id, payload, Kind.OWN)
    if not payload:
        cleared = Problem(None, "the spec was cleared")
        return Arrival(rollout_id, payload, Kind.CLEARED, problem=cleared)
    try:
        spec = trusted.verify_rollout_spec(payload, now=now)
    except RejectedError as exc:
        return Arrival(rollout_id, payload, Kind.INVALID, problem=Problem(exc.reason, str(exc)))
    if spec.id != rollout_id:
        replayed = Problem(Reason.REPLAYED, f"replayed: the signed spec is rollout {spec.id}'s")
        return Arrival(rollout_id, payload, Kind.INVALID, problem=replayed)
    kind = Kind.ABORTED if spec.desired is Desired.ABORTED else Kind.ACTIVE
    return Arrival(rollout_id, payload, kind, spec=spec)


@dataclass(frozen=True)
class Claim:
    """A spec being validated: its classes and artifacts are spoken for."""

    classes: frozenset[str]
    shas: frozenset[str]


def claim_problems(
    spec: RolloutSpec,
    profiles: Mapping[str, ClassProfile],
    rollouts: Iterable[RolloutRecord],
    claims: Mapping[str, Claim],
) -> list[str]:
    """Why the spec cannot be validated at all: unknown classes, or classes that a live
    rollout or a spec being validated holds."""
    problems: list[str] = []
    unknown = [c for c in spec.classes if c not in profiles]
    if unknown:
        problems.append(f"unknown classes {unknown}")
    wanted = set(spec.classes)
    busy = sorted(
        {r.id for r in rollouts if not r.phase.final and set(r.classes) & wanted}
        | {i for i, c in claims.items() if c.classes & wanted}
    )
    if busy:
        problems.append(f"classes already in rollout {busy}")
    return problems


def standing(
    arrival: Arrival,
    *,
    record: RolloutRecord | None,
    refusal: Refusal | None,
    validating: bool,
    finished: RolloutStatus | None,
    conflicts: bool,
    reason_chars: int,
) -> Standing:
    """What the coordinator holds of the id, as far as ``arrival`` cares.

    ``finished``: the retained status of the id, if it is final; ``conflicts``: whether
    :func:`claim_problems` found any.
    """
    spec = arrival.spec
    if spec is None:
        return _standing_unverified(arrival, record, refusal, reason_chars)
    if record is not None:
        if spec.generation < record.generation:
            return Standing.OLDER
        return Standing.SAME if spec.generation == record.generation else Standing.NEWER
    if validating:
        return Standing.VALIDATING
    if finished is not None and finished.generation >= spec.generation:
        return Standing.FINISHED
    return Standing.CONFLICT if conflicts else Standing.NONE


def _standing_unverified(
    arrival: Arrival, record: RolloutRecord | None, refusal: Refusal | None, reason_chars: int
) -> Standing:
    if record is not None:
        return Standing.RECORD
    if arrival.kind is Kind.CLEARED:
        return Standing.NONE  # never refused: nothing to report
    problem = arrival.problem
    if refusal is not None and (
        refusal.digest == digest(arrival.payload)
        or (problem is not None and refusal.reason == problem.text(reason_chars))
    ):
        return Standing.REFUSED
    return Standing.NONE


def refusals_to_forget(refusals: Mapping[str, Refusal], kept: int) -> list[str]:
    """The ids of the oldest refusals beyond ``kept``, oldest first."""
    excess = len(refusals) - kept
    if excess <= 0:
        return []
    return [r.id for r in sorted(refusals.values(), key=lambda r: r.at)[:excess]]


def retained_status(payload: bytes | None) -> RolloutStatus | None:
    """A retained status as the broker holds it; None when absent or unreadable."""
    if not payload:
        return None
    try:
        return decode(payload, RolloutStatus)
    except RejectedError:
        return None


def new_record(
    spec: RolloutSpec,
    payload: bytes,
    now: float,
    phase: Phase,
    *,
    profiles: Mapping[str, ClassProfile],
    candidates: dict[str, Release],
    reason: RolloutReason | None,
    reached: Mapping[str, int] | None = None,
) -> RolloutRecord:
    """The record of ``spec`` entering ``phase``, and why: one lane per class, each
    judged by its own policy, entering its first wave (or the wave it had ``reached``
    by a retained status) at the first tick that sees the whole fleet."""
    lane_phase = {
        Phase.COMPLETED: LanePhase.COMPLETED,
        Phase.ROLLED_BACK: LanePhase.ROLLED_BACK,
        Phase.REJECTED: LanePhase.ROLLED_BACK,
    }.get(phase, LanePhase.WAVE)
    lanes = {
        name: Lane(
            phase=lane_phase,
            wave=(reached or {}).get(name, 0),
            entered_at=now,
            policy=class_policy(
                spec,
                profiles.get(name),
                candidates[name].health if name in candidates else None,
            ),
        )
        for name in spec.classes
    }
    return RolloutRecord(
        id=spec.id,
        generation=spec.generation,
        spec=payload,
        classes=spec.classes,
        candidates=candidates,
        waves=spec.waves,
        canaries=spec.canaries,
        rate_per_min=spec.rate_per_min,
        all_or_nothing=spec.all_or_nothing,
        windows=spec.windows,
        lanes=lanes,
        desired=spec.desired,
        phase=phase,
        reason=None if reason is None else str(reason),
        cause=None if reason is None else reason.cause,
        updated_at=now,
        started=phase is not Phase.PAUSED,
    )


def finished_record(
    spec: RolloutSpec,
    payload: bytes,
    now: float,
    status: RolloutStatus,
    profiles: Mapping[str, ClassProfile],
) -> RolloutRecord:
    """A rollout recorded as its retained status says it ended, and why."""
    record = new_record(
        spec, payload, now, status.phase, profiles=profiles, candidates={}, reason=None
    )
    lanes = {
        name: lane.model_copy(
            update={"wave": min(status.wave, len(spec.waves) - 1), "counts": status.counts}
        )
        for name, lane in record.lanes.items()
    }
    return record.model_copy(
        update={
            "lanes": lanes,
            "reason": status.reason,
            "cause": status.cause,
            "updated_at": status.updated_at,
        }
    )


def new_generation(current: RolloutRecord, spec: RolloutSpec, payload: bytes) -> RolloutRecord:
    """A known rollout taking a newer generation of its spec (the operator's wish)."""
    return current.model_copy(
        update={"generation": spec.generation, "desired": spec.desired, "spec": payload}
    )


def admitted_phase(
    refusal: RolloutReason | None, newest: RolloutSpec
) -> tuple[Phase, RolloutReason | None]:
    """The phase a validated spec is admitted in, and why: rejected when the validation
    refused it, else decided by the newest generation that came meanwhile (an abort or
    pause is never preceded by a wave-0 manifest)."""
    if refusal is not None:
        return Phase.REJECTED, refusal
    if newest.desired is Desired.ABORTED:
        return Phase.ROLLED_BACK, RolloutReason(cause=Cause.OPERATOR_ABORT)
    if newest.desired is Desired.PAUSED:
        return Phase.PAUSED, None
    return Phase.WAVE, None


def retained_waves(status: RolloutStatus | None, spec: RolloutSpec) -> dict[str, int]:
    """The wave each class of a live rollout had reached by its retained status: a store
    that lost the rollout resumes there instead of shrinking its waves back to the first.
    A status from before lanes gives every class its one wave."""
    if status is None or status.phase is not Phase.WAVE or status.generation != spec.generation:
        return {}
    last = len(spec.waves) - 1
    if not status.lanes:
        return {name: min(status.wave, last) for name in spec.classes} if status.wave else {}
    return {
        name: min(lane.wave, last)
        for name, lane in status.lanes.items()
        if name in spec.classes and lane.phase is LanePhase.WAVE and lane.wave
    }
