"""Manifest derivation: what each class's manifest says, under which seq, and when it is
signed again. Pure: the store, the clock and the broker stay with the caller.

Theory of operation. A class's manifest names its stable release and, while a started
rollout in a wave or paused covers the class and the class's lane has entered its first
wave and not ended, that rollout's cohort (candidate, salt, the lane's bucket cutoff,
canaries). :func:`plan` compares that content with what the class record last signed:
a change, or a manifest past half its TTL, takes the next seq. The seq is stored before
the manifest is published, and a store that is behind the broker (new or lost) first
continues above the seq the broker retains (:func:`recover`), so a device never sees a
seq go back or repeat with other content.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from coordinator.rollout import RolloutRecord
from coordinator.store import ClassRecord
from schemas import (
    MANIFEST_KIND,
    MAX_SEQ,
    KeyPair,
    LanePhase,
    Manifest,
    Phase,
    RejectedError,
    Release,
    Role,
    RolloutCohort,
    TrustDoc,
    decode,
    encode,
    seal,
)
from schemas.envelope import open_envelope

__all__ = [
    "Planned",
    "Recovery",
    "RecoveryKind",
    "desired_content",
    "plan",
    "read_retained",
    "recover",
    "sign",
]


def desired_content(
    name: str, stable: Release | None, rollouts: Iterable[RolloutRecord]
) -> tuple[Release | None, RolloutCohort | None]:
    """The stable release and the cohort of the started live rollout covering ``name``."""
    for record in rollouts:
        lane = record.lanes.get(name)
        if (
            record.phase in (Phase.WAVE, Phase.PAUSED)
            and record.started
            and lane is not None
            and lane.target_bp is not None  # its first wave entered: it has a cutoff
            and lane.phase in (LanePhase.WAVE, LanePhase.PASSED)
        ):
            cohort = RolloutCohort(
                id=record.id,
                candidate=record.candidates[name],
                salt=record.id,
                cutoff_bp=lane.cutoff_bp,
                canaries=record.canaries,
            )
            return stable, cohort
    return stable, None


@dataclass(frozen=True)
class Planned:
    """A manifest to sign, store and publish, and the content it was derived from."""

    manifest: Manifest
    content: str


def plan(
    current: ClassRecord, rollouts: Iterable[RolloutRecord], ttl_s: float, now: float
) -> Planned | None:
    """The class's next manifest, or None when the one signed last still says it all
    and is less than half its TTL old.

    Raises:
        ValidationError: the manifest cannot be built (e.g. the seq is exhausted).
    """
    stable, cohort = desired_content(current.name, current.stable, rollouts)
    if stable is None and cohort is None:
        return None
    content = Manifest(
        hw_class=current.name, seq=1, issued_at=0, expires_at=0, stable=stable, rollout=cohort
    ).model_dump_json(include={"stable", "rollout"})
    fresh = now < current.expires_at - ttl_s / 2
    if content == current.content and fresh:
        return None
    manifest = Manifest(
        hw_class=current.name,
        seq=current.seq + 1,
        issued_at=now,
        expires_at=now + ttl_s,
        stable=stable,
        rollout=cohort,
    )
    return Planned(manifest, content)


def sign(current: ClassRecord, planned: Planned, key: KeyPair) -> ClassRecord:
    """The class record after signing ``planned``: to store before publishing."""
    signed = seal(MANIFEST_KIND, encode(planned.manifest), [key])
    return current.model_copy(
        update={
            "seq": planned.manifest.seq,
            "manifest": signed,
            "expires_at": planned.manifest.expires_at,
            "content": planned.content,
        }
    )


def read_retained(payload: bytes, trust: TrustDoc) -> Manifest | None:
    """A retained manifest signed with the trusted manifest key(s); None otherwise (not
    ours: the re-assert replaces it)."""
    try:
        body = open_envelope(
            payload,
            kind=MANIFEST_KIND,
            allowed=trust.keys_for(Role.MANIFEST),
            threshold=trust.roles[Role.MANIFEST].threshold,
        )
        return decode(body, Manifest)
    except RejectedError:
        return None


class RecoveryKind(StrEnum):
    KEEP = "keep"
    """The store is not behind the broker."""
    CONTINUE = "continue"
    """The store is behind: continue above the retained seq."""
    EXHAUSTED = "exhausted"
    """The broker holds the last seq there is: nothing can follow it under this key."""


@dataclass(frozen=True)
class Recovery:
    kind: RecoveryKind
    record: ClassRecord
    """The class record to store (for ``CONTINUE``), else the current one."""


def recover(current: ClassRecord, retained: Manifest) -> Recovery:
    """Continue above a retained manifest's seq when the store is behind it; such a
    class also takes the retained stable release when it has none, so that its
    artifact stays named."""
    if retained.hw_class != current.name or retained.seq <= current.seq:
        return Recovery(RecoveryKind.KEEP, current)
    if retained.seq >= MAX_SEQ:
        return Recovery(RecoveryKind.EXHAUSTED, current)
    update: dict[str, object] = {"seq": retained.seq, "content": ""}
    if current.stable is None and retained.stable is not None:
        update["stable"] = retained.stable
    return Recovery(RecoveryKind.CONTINUE, current.model_copy(update=update))
