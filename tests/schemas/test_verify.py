"""TrustedState: every attack on manifests, rollout specs and the TrustDoc, one per test."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
import pytest

from schemas import (
    MANIFEST_KIND,
    ROLLOUT_SPEC_KIND,
    TRUST_KIND,
    KeyPair,
    MalformedPayloadError,
    Manifest,
    PolicyError,
    Reason,
    RejectedError,
    Role,
    RoleKeys,
    RolloutSpec,
    SignatureError,
    TrustDoc,
    TrustedState,
    decode,
    encode,
    public_raw,
    seal,
)
from schemas.envelope import Envelope

DAY = 86_400.0
APPLIED_SEQ = 4  # the fixture manifest is seq 5


@dataclass(frozen=True)
class Roles:
    """The private keys behind the version-1 trust, one per role."""

    root: KeyPair
    manifest: KeyPair
    operator: KeyPair


@pytest.fixture
def roles(root_key: KeyPair, manifest_key: KeyPair, operator_key: KeyPair) -> Roles:
    return Roles(root=root_key, manifest=manifest_key, operator=operator_key)


def _trust(
    *,
    version: int,
    root: Sequence[KeyPair],
    manifest: Sequence[KeyPair],
    operator: Sequence[KeyPair],
    now: float,
    root_threshold: int = 1,
    manifest_threshold: int = 1,
    expires_in: float = 365 * DAY,
) -> TrustDoc:
    every = [*root, *manifest, *operator]
    return TrustDoc(
        version=version,
        issued_at=now,
        expires_at=now + expires_in,
        keys={k.id: public_raw(k.public) for k in every},
        roles={
            Role.ROOT: RoleKeys(keys=tuple(k.id for k in root), threshold=root_threshold),
            Role.MANIFEST: RoleKeys(
                keys=tuple(k.id for k in manifest), threshold=manifest_threshold
            ),
            Role.OPERATOR: RoleKeys(keys=tuple(k.id for k in operator)),
        },
    )


def _sealed_trust(doc: TrustDoc, *signers: KeyPair) -> bytes:
    return seal(TRUST_KIND, encode(doc), signers)


def _sealed_manifest(manifest: Manifest, *signers: KeyPair) -> bytes:
    return seal(MANIFEST_KIND, encode(manifest), signers)


def _manifest_rejection(
    trusted: TrustedState,
    data: bytes,
    *,
    hw_class: str,
    now: float,
    applied_seq: int = APPLIED_SEQ,
) -> Reason:
    with pytest.raises(RejectedError) as info:
        trusted.verify_manifest(data, hw_class=hw_class, applied_seq=applied_seq, now=now)
    return info.value.reason


def _trust_rejection(trusted: TrustedState, data: bytes, *, now: float) -> Reason:
    before = trusted.trust
    with pytest.raises(RejectedError) as info:
        trusted.update_trust(data, now=now)
    assert trusted.trust is before, "a rejected TrustDoc must leave the current trust in place"
    return info.value.reason


def _flip_body_byte(data: bytes) -> bytes:
    envelope = decode(data, Envelope)
    body = bytearray(envelope.body)
    body[len(body) // 2] ^= 0x01
    return encode(Envelope(kind=envelope.kind, body=bytes(body), sigs=envelope.sigs))


# --- manifests ---------------------------------------------------------------------


def test_manifest_signed_by_the_manifest_key_is_accepted(
    trusted: TrustedState, manifest: Manifest, manifest_key: KeyPair, hw_class: str, now: float
) -> None:
    verified = trusted.verify_manifest(
        _sealed_manifest(manifest, manifest_key),
        hw_class=hw_class,
        applied_seq=APPLIED_SEQ,
        now=now,
    )
    assert verified == manifest


def test_manifest_tampered_in_transit_is_rejected_bad_signature(
    trusted: TrustedState, manifest: Manifest, manifest_key: KeyPair, hw_class: str, now: float
) -> None:
    tampered = _flip_body_byte(_sealed_manifest(manifest, manifest_key))
    reason = _manifest_rejection(trusted, tampered, hw_class=hw_class, now=now)
    assert reason is Reason.BAD_SIGNATURE


def test_manifest_with_cutoff_raised_by_an_attacker_is_rejected_bad_signature(
    trusted: TrustedState, manifest: Manifest, manifest_key: KeyPair, hw_class: str, now: float
) -> None:
    # The attacker swaps in a re-encoded body that pushes every device onto the candidate.
    data = _sealed_manifest(manifest, manifest_key)
    envelope = decode(data, Envelope)
    raw = msgpack.unpackb(envelope.body, raw=False)
    raw["rollout"]["cutoff_bp"] = 10_000
    forged = encode(
        Envelope(
            kind=MANIFEST_KIND,
            body=msgpack.packb(raw, use_bin_type=True),
            sigs=envelope.sigs,
        )
    )
    reason = _manifest_rejection(trusted, forged, hw_class=hw_class, now=now)
    assert reason is Reason.BAD_SIGNATURE


def test_unsigned_manifest_is_rejected_unsigned(
    trusted: TrustedState, manifest: Manifest, hw_class: str, now: float
) -> None:
    unsigned = encode(Envelope(kind=MANIFEST_KIND, body=encode(manifest), sigs=()))
    reason = _manifest_rejection(trusted, unsigned, hw_class=hw_class, now=now)
    assert reason is Reason.UNSIGNED


def test_manifest_signed_by_the_operator_key_is_rejected_unknown_key(
    trusted: TrustedState, manifest: Manifest, operator_key: KeyPair, hw_class: str, now: float
) -> None:
    data = _sealed_manifest(manifest, operator_key)
    assert _manifest_rejection(trusted, data, hw_class=hw_class, now=now) is Reason.UNKNOWN_KEY


def test_manifest_signed_by_the_root_key_is_rejected_unknown_key(
    trusted: TrustedState, manifest: Manifest, root_key: KeyPair, hw_class: str, now: float
) -> None:
    data = _sealed_manifest(manifest, root_key)
    assert _manifest_rejection(trusted, data, hw_class=hw_class, now=now) is Reason.UNKNOWN_KEY


def test_manifest_signed_by_a_stranger_is_rejected_unknown_key(
    trusted: TrustedState, manifest: Manifest, hw_class: str, now: float
) -> None:
    data = _sealed_manifest(manifest, KeyPair.generate())
    assert _manifest_rejection(trusted, data, hw_class=hw_class, now=now) is Reason.UNKNOWN_KEY


def test_manifest_replayed_lower_seq_is_rejected_replayed(
    trusted: TrustedState, manifest: Manifest, manifest_key: KeyPair, hw_class: str, now: float
) -> None:
    data = _sealed_manifest(manifest, manifest_key)
    reason = _manifest_rejection(trusted, data, hw_class=hw_class, now=now, applied_seq=9)
    assert reason is Reason.REPLAYED


def test_manifest_replayed_same_seq_is_rejected_replayed(
    trusted: TrustedState, manifest: Manifest, manifest_key: KeyPair, hw_class: str, now: float
) -> None:
    data = _sealed_manifest(manifest, manifest_key)
    reason = _manifest_rejection(
        trusted, data, hw_class=hw_class, now=now, applied_seq=manifest.seq
    )
    assert reason is Reason.REPLAYED


def test_manifest_expired_is_rejected_expired(
    trusted: TrustedState, manifest: Manifest, manifest_key: KeyPair, hw_class: str, now: float
) -> None:
    data = _sealed_manifest(manifest.model_copy(update={"expires_at": now - 1.0}), manifest_key)
    assert _manifest_rejection(trusted, data, hw_class=hw_class, now=now) is Reason.EXPIRED


def test_manifest_expiring_exactly_now_is_rejected_expired(
    trusted: TrustedState, manifest: Manifest, manifest_key: KeyPair, hw_class: str, now: float
) -> None:
    data = _sealed_manifest(manifest.model_copy(update={"expires_at": now}), manifest_key)
    assert _manifest_rejection(trusted, data, hw_class=hw_class, now=now) is Reason.EXPIRED


def test_frozen_cloud_manifest_is_rejected_expired_once_its_time_passes(
    trusted: TrustedState, manifest: Manifest, manifest_key: KeyPair, hw_class: str, now: float
) -> None:
    data = _sealed_manifest(manifest, manifest_key)
    trusted.verify_manifest(data, hw_class=hw_class, applied_seq=APPLIED_SEQ, now=now)
    later = manifest.expires_at + 1.0
    assert _manifest_rejection(trusted, data, hw_class=hw_class, now=later) is Reason.EXPIRED


def test_manifest_for_another_class_is_rejected_wrong_class(
    trusted: TrustedState, manifest: Manifest, manifest_key: KeyPair, now: float
) -> None:
    data = _sealed_manifest(manifest, manifest_key)
    reason = _manifest_rejection(trusted, data, hw_class="medical-cart-cpu", now=now)
    assert reason is Reason.WRONG_CLASS


def test_malformed_manifest_body_under_a_valid_signature_is_rejected_schema(
    trusted: TrustedState, manifest_key: KeyPair, hw_class: str, now: float
) -> None:
    data = seal(MANIFEST_KIND, msgpack.packb({"v": 1, "seq": "lots"}), [manifest_key])
    with pytest.raises(MalformedPayloadError) as info:
        trusted.verify_manifest(data, hw_class=hw_class, applied_seq=APPLIED_SEQ, now=now)
    assert info.value.reason is Reason.SCHEMA


def test_rollout_spec_presented_as_a_manifest_is_rejected_wrong_kind(
    trusted: TrustedState,
    rollout_spec: RolloutSpec,
    manifest_key: KeyPair,
    hw_class: str,
    now: float,
) -> None:
    data = seal(ROLLOUT_SPEC_KIND, encode(rollout_spec), [manifest_key])
    assert _manifest_rejection(trusted, data, hw_class=hw_class, now=now) is Reason.WRONG_KIND


# --- the fixed order of checks -----------------------------------------------------


def test_manifest_of_wrong_class_and_expired_and_replayed_reports_wrong_class(
    trusted: TrustedState, manifest: Manifest, manifest_key: KeyPair, now: float
) -> None:
    stale = manifest.model_copy(update={"expires_at": now - DAY})
    data = _sealed_manifest(stale, manifest_key)
    reason = _manifest_rejection(
        trusted, data, hw_class="medical-cart-cpu", now=now, applied_seq=99
    )
    assert reason is Reason.WRONG_CLASS


def test_manifest_replayed_and_expired_reports_replayed(
    trusted: TrustedState, manifest: Manifest, manifest_key: KeyPair, hw_class: str, now: float
) -> None:
    data = _sealed_manifest(manifest.model_copy(update={"expires_at": now - DAY}), manifest_key)
    reason = _manifest_rejection(trusted, data, hw_class=hw_class, now=now, applied_seq=99)
    assert reason is Reason.REPLAYED


def test_tampered_expired_wrong_class_manifest_reports_bad_signature(
    trusted: TrustedState, manifest: Manifest, manifest_key: KeyPair, now: float
) -> None:
    stale = manifest.model_copy(update={"expires_at": now - DAY})
    tampered = _flip_body_byte(_sealed_manifest(stale, manifest_key))
    reason = _manifest_rejection(
        trusted, tampered, hw_class="medical-cart-cpu", now=now, applied_seq=99
    )
    assert reason is Reason.BAD_SIGNATURE


def test_expired_manifest_signed_by_an_unknown_key_reports_unknown_key(
    trusted: TrustedState, manifest: Manifest, hw_class: str, now: float
) -> None:
    stale = manifest.model_copy(update={"expires_at": now - DAY})
    data = _sealed_manifest(stale, KeyPair.generate())
    assert _manifest_rejection(trusted, data, hw_class=hw_class, now=now) is Reason.UNKNOWN_KEY


def test_rejection_families_match_the_error_tree(
    trusted: TrustedState, manifest: Manifest, manifest_key: KeyPair, hw_class: str, now: float
) -> None:
    data = _sealed_manifest(manifest, manifest_key)
    with pytest.raises(SignatureError):
        trusted.verify_manifest(
            _flip_body_byte(data), hw_class=hw_class, applied_seq=APPLIED_SEQ, now=now
        )
    with pytest.raises(PolicyError):
        trusted.verify_manifest(data, hw_class=hw_class, applied_seq=99, now=now)
    with pytest.raises(MalformedPayloadError):
        trusted.verify_manifest(data[:-3], hw_class=hw_class, applied_seq=APPLIED_SEQ, now=now)


# --- trust -------------------------------------------------------------------------


def test_manifest_before_any_trust_doc_is_rejected_not_trusted(
    root_key: KeyPair, manifest: Manifest, manifest_key: KeyPair, hw_class: str, now: float
) -> None:
    fresh = TrustedState({root_key.id: root_key.public})
    data = _sealed_manifest(manifest, manifest_key)
    assert _manifest_rejection(fresh, data, hw_class=hw_class, now=now) is Reason.NOT_TRUSTED
    assert fresh.trust_version == 0


def test_rollout_spec_before_any_trust_doc_is_rejected_not_trusted(
    root_key: KeyPair, rollout_spec: RolloutSpec, operator_key: KeyPair, now: float
) -> None:
    fresh = TrustedState({root_key.id: root_key.public})
    data = seal(ROLLOUT_SPEC_KIND, encode(rollout_spec), [operator_key])
    with pytest.raises(PolicyError) as info:
        fresh.verify_rollout_spec(data, now=now)
    assert info.value.reason is Reason.NOT_TRUSTED


def test_manifest_under_an_expired_trust_doc_is_rejected_expired(
    trusted: TrustedState, manifest: Manifest, manifest_key: KeyPair, hw_class: str, now: float
) -> None:
    assert trusted.trust is not None
    after_trust = trusted.trust.expires_at + 1.0
    fresh = manifest.model_copy(update={"expires_at": after_trust + DAY})
    data = _sealed_manifest(fresh, manifest_key)
    reason = _manifest_rejection(trusted, data, hw_class=hw_class, now=after_trust)
    assert reason is Reason.EXPIRED


def test_trust_doc_signed_by_a_stranger_is_rejected_unknown_key(
    root_key: KeyPair, manifest_key: KeyPair, operator_key: KeyPair, now: float
) -> None:
    fresh = TrustedState({root_key.id: root_key.public})
    mallory = KeyPair.generate()
    doc = _trust(version=1, root=[mallory], manifest=[mallory], operator=[operator_key], now=now)
    assert _trust_rejection(fresh, _sealed_trust(doc, mallory), now=now) is Reason.UNKNOWN_KEY


def test_trust_doc_signed_by_the_manifest_key_is_rejected_unknown_key(
    trusted: TrustedState,
    root_key: KeyPair,
    manifest_key: KeyPair,
    operator_key: KeyPair,
    now: float,
) -> None:
    # The manifest key tries to promote itself to root.
    doc = _trust(
        version=2, root=[manifest_key], manifest=[manifest_key], operator=[operator_key], now=now
    )
    reason = _trust_rejection(trusted, _sealed_trust(doc, manifest_key), now=now)
    assert reason is Reason.UNKNOWN_KEY


def test_trust_doc_tampered_in_transit_is_rejected_bad_signature(
    root_key: KeyPair, trust_doc: TrustDoc, now: float
) -> None:
    fresh = TrustedState({root_key.id: root_key.public})
    tampered = _flip_body_byte(_sealed_trust(trust_doc, root_key))
    assert _trust_rejection(fresh, tampered, now=now) is Reason.BAD_SIGNATURE


def test_trust_doc_not_listing_its_own_signer_as_root_is_rejected(
    root_key: KeyPair, manifest_key: KeyPair, operator_key: KeyPair, now: float
) -> None:
    # Signed by the enrollment root, but hands root to a key that did not sign it.
    fresh = TrustedState({root_key.id: root_key.public})
    successor = KeyPair.generate()
    doc = _trust(
        version=1, root=[successor], manifest=[manifest_key], operator=[operator_key], now=now
    )
    assert _trust_rejection(fresh, _sealed_trust(doc, root_key), now=now) is Reason.UNKNOWN_KEY


def test_trust_version_rollback_is_rejected_replayed(
    trusted: TrustedState, root_key: KeyPair, trust_doc: TrustDoc, now: float
) -> None:
    v2 = trust_doc.model_copy(update={"version": 2})
    trusted.update_trust(_sealed_trust(v2, root_key), now=now)
    old = _sealed_trust(trust_doc, root_key)
    assert _trust_rejection(trusted, old, now=now) is Reason.REPLAYED
    assert trusted.trust_version == 2


def test_trust_doc_replayed_same_version_is_rejected_replayed(
    trusted: TrustedState, root_key: KeyPair, trust_doc: TrustDoc, now: float
) -> None:
    assert _trust_rejection(trusted, _sealed_trust(trust_doc, root_key), now=now) is (
        Reason.REPLAYED
    )


def test_expired_trust_doc_is_rejected_expired(
    root_key: KeyPair, trust_doc: TrustDoc, now: float
) -> None:
    fresh = TrustedState({root_key.id: root_key.public})
    stale = trust_doc.model_copy(update={"expires_at": now - 1.0})
    assert _trust_rejection(fresh, _sealed_trust(stale, root_key), now=now) is Reason.EXPIRED


def test_manifest_presented_as_trust_doc_is_rejected_wrong_kind(
    trusted: TrustedState, manifest: Manifest, root_key: KeyPair, now: float
) -> None:
    data = _sealed_manifest(manifest, root_key)
    assert _trust_rejection(trusted, data, now=now) is Reason.WRONG_KIND


def test_trust_rotation_signed_by_old_and_new_root_is_accepted_and_drops_old_keys(
    trusted: TrustedState,
    roles: Roles,
    manifest: Manifest,
    hw_class: str,
    now: float,
) -> None:
    new_root, new_manifest_key = KeyPair.generate(), KeyPair.generate()
    v2 = _trust(
        version=2, root=[new_root], manifest=[new_manifest_key], operator=[roles.operator], now=now
    )
    accepted = trusted.update_trust(_sealed_trust(v2, roles.root, new_root), now=now)
    assert accepted == v2
    assert trusted.trust_version == 2

    # The manifest key dropped in v2 is refused; its replacement is accepted.
    old_signed = _sealed_manifest(manifest, roles.manifest)
    reason = _manifest_rejection(trusted, old_signed, hw_class=hw_class, now=now)
    assert reason is Reason.UNKNOWN_KEY
    new_signed = _sealed_manifest(manifest, new_manifest_key)
    assert trusted.verify_manifest(new_signed, hw_class=hw_class, applied_seq=4, now=now)

    # The dropped root can no longer sign trust on its own: v3 needs the new root.
    v3 = v2.model_copy(update={"version": 3})
    assert _trust_rejection(trusted, _sealed_trust(v3, roles.root), now=now) is Reason.UNKNOWN_KEY
    assert trusted.update_trust(_sealed_trust(v3, new_root), now=now).version == 3


def test_trust_rotation_signed_only_by_the_new_root_is_rejected(
    trusted: TrustedState, manifest_key: KeyPair, operator_key: KeyPair, now: float
) -> None:
    new_root = KeyPair.generate()
    v2 = _trust(
        version=2, root=[new_root], manifest=[manifest_key], operator=[operator_key], now=now
    )
    assert _trust_rejection(trusted, _sealed_trust(v2, new_root), now=now) is Reason.UNKNOWN_KEY
    assert trusted.trust_version == 1


def test_trust_rotation_signed_only_by_the_old_root_is_rejected(
    trusted: TrustedState,
    root_key: KeyPair,
    manifest_key: KeyPair,
    operator_key: KeyPair,
    now: float,
) -> None:
    new_root = KeyPair.generate()
    v2 = _trust(
        version=2, root=[new_root], manifest=[manifest_key], operator=[operator_key], now=now
    )
    assert _trust_rejection(trusted, _sealed_trust(v2, root_key), now=now) is Reason.UNKNOWN_KEY


def test_root_threshold_raised_to_two_then_single_root_signature_is_rejected(
    trusted: TrustedState,
    root_key: KeyPair,
    manifest_key: KeyPair,
    operator_key: KeyPair,
    now: float,
) -> None:
    second_root = KeyPair.generate()
    roots = [root_key, second_root]
    v2 = _trust(
        version=2,
        root=roots,
        root_threshold=2,
        manifest=[manifest_key],
        operator=[operator_key],
        now=now,
    )
    # v2 must already meet its own threshold of two.
    assert _trust_rejection(trusted, _sealed_trust(v2, root_key), now=now) is Reason.UNSIGNED
    trusted.update_trust(_sealed_trust(v2, root_key, second_root), now=now)

    v3 = v2.model_copy(update={"version": 3})
    assert _trust_rejection(trusted, _sealed_trust(v3, second_root), now=now) is Reason.UNSIGNED
    assert _trust_rejection(trusted, _sealed_trust(v3, root_key, root_key), now=now) is (
        Reason.UNSIGNED
    )
    assert trusted.update_trust(_sealed_trust(v3, second_root, root_key), now=now).version == 3


def test_manifest_threshold_two_with_one_manifest_signature_is_rejected(
    trusted: TrustedState,
    roles: Roles,
    manifest: Manifest,
    hw_class: str,
    now: float,
) -> None:
    second = KeyPair.generate()
    v2 = _trust(
        version=2,
        root=[roles.root],
        manifest=[roles.manifest, second],
        manifest_threshold=2,
        operator=[roles.operator],
        now=now,
    )
    trusted.update_trust(_sealed_trust(v2, roles.root), now=now)
    one = _sealed_manifest(manifest, roles.manifest)
    assert _manifest_rejection(trusted, one, hw_class=hw_class, now=now) is Reason.UNSIGNED
    both = _sealed_manifest(manifest, roles.manifest, second)
    assert trusted.verify_manifest(both, hw_class=hw_class, applied_seq=APPLIED_SEQ, now=now)


def test_trust_doc_with_a_key_id_not_matching_its_bytes_is_rejected_schema(
    root_key: KeyPair, trust_doc: TrustDoc, now: float
) -> None:
    impostor = KeyPair.generate()
    raw = msgpack.unpackb(encode(trust_doc), raw=False)
    # Keep root_key's id but substitute the impostor's public bytes.
    raw["keys"][root_key.id] = public_raw(impostor.public)
    data = seal(TRUST_KIND, msgpack.packb(raw, use_bin_type=True), [root_key])
    fresh = TrustedState({root_key.id: root_key.public})
    assert _trust_rejection(fresh, data, now=now) is Reason.SCHEMA


# --- rollout specs -----------------------------------------------------------------


def test_rollout_spec_signed_by_the_operator_key_is_accepted(
    trusted: TrustedState, rollout_spec: RolloutSpec, operator_key: KeyPair, now: float
) -> None:
    data = seal(ROLLOUT_SPEC_KIND, encode(rollout_spec), [operator_key])
    assert trusted.verify_rollout_spec(data, now=now) == rollout_spec


@pytest.mark.parametrize("signer", ["manifest_key", "root_key"])
def test_rollout_spec_signed_by_a_non_operator_key_is_rejected_unknown_key(
    trusted: TrustedState,
    rollout_spec: RolloutSpec,
    signer: str,
    request: pytest.FixtureRequest,
    now: float,
) -> None:
    key: KeyPair = request.getfixturevalue(signer)
    data = seal(ROLLOUT_SPEC_KIND, encode(rollout_spec), [key])
    with pytest.raises(SignatureError) as info:
        trusted.verify_rollout_spec(data, now=now)
    assert info.value.reason is Reason.UNKNOWN_KEY


def test_manifest_presented_as_rollout_spec_is_rejected_wrong_kind(
    trusted: TrustedState, manifest: Manifest, operator_key: KeyPair, now: float
) -> None:
    data = _sealed_manifest(manifest, operator_key)
    with pytest.raises(SignatureError) as info:
        trusted.verify_rollout_spec(data, now=now)
    assert info.value.reason is Reason.WRONG_KIND


def test_rollout_spec_under_an_expired_trust_doc_is_rejected_expired(
    trusted: TrustedState, rollout_spec: RolloutSpec, operator_key: KeyPair
) -> None:
    assert trusted.trust is not None
    data = seal(ROLLOUT_SPEC_KIND, encode(rollout_spec), [operator_key])
    with pytest.raises(PolicyError) as info:
        trusted.verify_rollout_spec(data, now=trusted.trust.expires_at)
    assert info.value.reason is Reason.EXPIRED


def test_trusted_state_without_root_keys_is_refused() -> None:
    with pytest.raises(ValueError, match="root key"):
        TrustedState({})


def test_manifest_key_dropped_by_rotation_is_refused_after_it_verified_before(
    trusted: TrustedState, roles: Roles, manifest: Manifest, hw_class: str, now: float
) -> None:
    # The role keys are built once per TrustDoc: the ones of v1, used for a manifest,
    # must not outlive v1.
    old_signed = _sealed_manifest(manifest, roles.manifest)
    assert trusted.verify_manifest(old_signed, hw_class=hw_class, applied_seq=4, now=now)
    new_manifest_key = KeyPair.generate()
    v2 = _trust(
        version=2,
        root=[roles.root],
        manifest=[new_manifest_key],
        operator=[roles.operator],
        now=now,
    )
    trusted.update_trust(_sealed_trust(v2, roles.root), now=now)

    reason = _manifest_rejection(trusted, old_signed, hw_class=hw_class, now=now)
    assert reason is Reason.UNKNOWN_KEY
    new_signed = _sealed_manifest(manifest, new_manifest_key)
    assert trusted.verify_manifest(new_signed, hw_class=hw_class, applied_seq=4, now=now)


def test_trust_rotation_refused_keeps_the_role_keys_of_the_trust_held(
    trusted: TrustedState, roles: Roles, manifest: Manifest, hw_class: str, now: float
) -> None:
    expired = _trust(
        version=2,
        root=[roles.root],
        manifest=[KeyPair.generate()],
        operator=[roles.operator],
        now=now,
        expires_in=-1.0,
    )
    assert _trust_rejection(trusted, _sealed_trust(expired, roles.root), now=now) is Reason.EXPIRED

    signed = _sealed_manifest(manifest, roles.manifest)
    assert trusted.verify_manifest(signed, hw_class=hw_class, applied_seq=4, now=now)
