"""Manifest derivation (``coordinator.manifests``): content, seq, re-signing at half the
TTL, and continuing above the broker's retained seq. Pure: no store, broker or clock."""

from __future__ import annotations

from typing import Any

import pytest

from coordinator import manifests
from coordinator.manifests import RecoveryKind
from coordinator.store import ClassRecord
from schemas import (
    MANIFEST_KIND,
    MAX_SEQ,
    Desired,
    KeyPair,
    Manifest,
    Phase,
    Role,
    RoleKeys,
    TrustDoc,
    decode,
    public_raw,
)
from schemas.envelope import open_envelope
from tests.coordinator.conftest import CLASS, T0
from tests.coordinator.records import make_record, make_release

TTL = 3600.0
STABLE = make_release("digits-v1", "cd" * 32)


def _signed(key: KeyPair, record: ClassRecord, now: float = T0) -> ClassRecord:
    planned = manifests.plan(record, [], TTL, now)
    assert planned is not None
    return manifests.sign(record, planned, key)


def _trust(key: KeyPair) -> TrustDoc:
    return TrustDoc(
        version=1,
        issued_at=T0,
        expires_at=T0 + TTL,
        keys={key.id: public_raw(key.public)},
        roles={role: RoleKeys(keys=(key.id,)) for role in Role},
    )


def test_a_class_with_nothing_to_name_gets_no_manifest() -> None:
    assert manifests.plan(ClassRecord(name=CLASS), [], TTL, T0) is None


def test_the_first_manifest_takes_seq_one_and_expires_after_the_ttl() -> None:
    planned = manifests.plan(ClassRecord(name=CLASS, stable=STABLE), [], TTL, T0)
    assert planned is not None
    assert (planned.manifest.seq, planned.manifest.issued_at) == (1, T0)
    assert planned.manifest.expires_at == T0 + TTL
    assert planned.manifest.stable == STABLE
    assert planned.manifest.rollout is None


def test_a_signed_manifest_is_stored_with_its_seq_content_and_expiry() -> None:
    key = KeyPair.generate()
    record = _signed(key, ClassRecord(name=CLASS, seq=4, stable=STABLE))
    assert (record.seq, record.expires_at) == (5, T0 + TTL)
    assert record.manifest is not None
    body = open_envelope(record.manifest, kind=MANIFEST_KIND, allowed={key.id: key.public})
    assert decode(body, Manifest).seq == 5


def test_unchanged_content_is_not_signed_again_before_half_the_ttl() -> None:
    record = _signed(KeyPair.generate(), ClassRecord(name=CLASS, stable=STABLE))
    assert manifests.plan(record, [], TTL, T0 + TTL / 2 - 1) is None
    again = manifests.plan(record, [], TTL, T0 + TTL / 2)
    assert again is not None
    assert again.manifest.seq == record.seq + 1


def test_a_started_live_rollout_puts_its_cohort_in_the_next_seq() -> None:
    record = _signed(KeyPair.generate(), ClassRecord(name=CLASS, stable=STABLE))
    rollout = make_record(wave=1)
    planned = manifests.plan(record, [rollout], TTL, T0 + 1)
    assert planned is not None
    cohort = planned.manifest.rollout
    assert cohort is not None
    assert (cohort.id, cohort.salt, cohort.cutoff_bp) == ("rollout-7", "rollout-7", 5000)
    assert cohort.candidate == rollout.candidates[CLASS]
    assert cohort.canaries == ("cam-canary",)
    assert planned.manifest.seq == record.seq + 1


@pytest.mark.parametrize(
    "changes",
    [
        {"started": False, "phase": Phase.PAUSED},
        {"phase": Phase.COMPLETED},
        {"phase": Phase.ROLLED_BACK},
        {"phase": Phase.REJECTED},
        {"classes": ("other-class",)},
    ],
)
def test_a_rollout_not_started_ended_or_elsewhere_names_no_cohort(
    changes: dict[str, Any],
) -> None:
    record = _signed(KeyPair.generate(), ClassRecord(name=CLASS, stable=STABLE))
    assert manifests.plan(record, [make_record(**changes)], TTL, T0 + 1) is None


def test_a_paused_rollout_that_had_started_keeps_its_cohort() -> None:
    stable, cohort = manifests.desired_content(
        CLASS, STABLE, [make_record(phase=Phase.PAUSED, desired=Desired.PAUSED)]
    )
    assert stable == STABLE
    assert cohort is not None


def test_a_store_behind_the_broker_continues_above_the_retained_seq() -> None:
    retained = Manifest(
        hw_class=CLASS, seq=9, issued_at=T0, expires_at=T0 + TTL, stable=STABLE, rollout=None
    )
    recovery = manifests.recover(ClassRecord(name=CLASS, seq=3), retained)
    assert recovery.kind is RecoveryKind.CONTINUE
    assert (recovery.record.seq, recovery.record.stable) == (9, STABLE)
    assert recovery.record.content == ""  # so the next sync signs seq 10 whatever it says
    planned = manifests.plan(recovery.record, [], TTL, T0)
    assert planned is not None
    assert planned.manifest.seq == 10


def test_a_store_stable_is_kept_over_the_retained_one() -> None:
    retained = Manifest(
        hw_class=CLASS, seq=9, issued_at=T0, expires_at=T0 + TTL, stable=STABLE, rollout=None
    )
    ours = make_release("digits-v3", "ef" * 32)
    recovery = manifests.recover(ClassRecord(name=CLASS, seq=3, stable=ours), retained)
    assert recovery.record.stable == ours


@pytest.mark.parametrize(("seq", "hw_class"), [(3, CLASS), (2, CLASS), (9, "other-class")])
def test_a_store_level_with_or_ahead_of_the_broker_keeps_its_seq(seq: int, hw_class: str) -> None:
    retained = Manifest(
        hw_class=hw_class, seq=seq, issued_at=T0, expires_at=T0 + TTL, stable=STABLE
    )
    current = ClassRecord(name=CLASS, seq=3)
    assert manifests.recover(current, retained).kind is RecoveryKind.KEEP


def test_nothing_continues_above_the_last_seq() -> None:
    retained = Manifest(
        hw_class=CLASS, seq=MAX_SEQ, issued_at=T0, expires_at=T0 + TTL, stable=STABLE
    )
    recovery = manifests.recover(ClassRecord(name=CLASS, seq=3), retained)
    assert recovery.kind is RecoveryKind.EXHAUSTED
    assert recovery.record.seq == 3


def test_only_a_manifest_signed_with_a_trusted_manifest_key_is_read() -> None:
    ours, theirs = KeyPair.generate(), KeyPair.generate()
    record = _signed(ours, ClassRecord(name=CLASS, stable=STABLE))
    assert record.manifest is not None
    read = manifests.read_retained(record.manifest, _trust(ours))
    assert read is not None
    assert read.seq == 1
    assert manifests.read_retained(record.manifest, _trust(theirs)) is None
    assert manifests.read_retained(b"junk", _trust(ours)) is None
