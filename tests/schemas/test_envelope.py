"""Signed envelopes, attacked one way at a time."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from schemas import (
    MANIFEST_KIND,
    ROLLOUT_SPEC_KIND,
    TRUST_KIND,
    KeyPair,
    MalformedPayloadError,
    Reason,
    SignatureError,
    UsageError,
    decode,
    encode,
    key_id,
    open_envelope,
    public_from_raw,
    public_raw,
    seal,
)
from schemas.envelope import MAX_SIGNATURES, Envelope, Signature

BODY = b"\x85\xa1v\x01 any body bytes; the envelope never looks inside"


def _allowed(*keys: KeyPair) -> dict[str, Ed25519PublicKey]:
    return {k.id: k.public for k in keys}


def _open_rejection(
    data: bytes, *, kind: str, allowed: dict[str, Ed25519PublicKey], threshold: int = 1
) -> Reason:
    with pytest.raises(SignatureError) as info:
        open_envelope(data, kind=kind, allowed=allowed, threshold=threshold)
    return info.value.reason


def _rewrap(data: bytes, *, kind: str | None = None, body: bytes | None = None) -> bytes:
    """Re-encode an envelope with the same signatures but another kind or body."""
    envelope = decode(data, Envelope)
    return encode(
        Envelope(
            kind=envelope.kind if kind is None else kind,
            body=envelope.body if body is None else body,
            sigs=envelope.sigs,
        )
    )


def test_sealed_body_opens_to_the_exact_bytes(manifest_key: KeyPair) -> None:
    data = seal(MANIFEST_KIND, BODY, [manifest_key])
    assert open_envelope(data, kind=MANIFEST_KIND, allowed=_allowed(manifest_key)) == BODY


def test_tampered_body_is_rejected_bad_signature(manifest_key: KeyPair) -> None:
    data = seal(MANIFEST_KIND, BODY, [manifest_key])
    for i in (0, len(BODY) // 2, len(BODY) - 1):
        flipped = bytearray(BODY)
        flipped[i] ^= 0x01
        tampered = _rewrap(data, body=bytes(flipped))
        reason = _open_rejection(tampered, kind=MANIFEST_KIND, allowed=_allowed(manifest_key))
        assert reason is Reason.BAD_SIGNATURE


def test_body_flipped_in_place_in_the_envelope_bytes_is_rejected_bad_signature(
    manifest_key: KeyPair,
) -> None:
    data = seal(MANIFEST_KIND, BODY, [manifest_key])
    at = data.index(BODY) + 5
    tampered = data[:at] + bytes([data[at] ^ 0x80]) + data[at + 1 :]
    reason = _open_rejection(tampered, kind=MANIFEST_KIND, allowed=_allowed(manifest_key))
    assert reason is Reason.BAD_SIGNATURE


def test_body_extended_or_truncated_is_rejected_bad_signature(manifest_key: KeyPair) -> None:
    data = seal(MANIFEST_KIND, BODY, [manifest_key])
    for body in (BODY + b"\x00", BODY[:-1], b""):
        reason = _open_rejection(
            _rewrap(data, body=body), kind=MANIFEST_KIND, allowed=_allowed(manifest_key)
        )
        assert reason is Reason.BAD_SIGNATURE


def test_forged_signature_bytes_are_rejected_bad_signature(manifest_key: KeyPair) -> None:
    envelope = decode(seal(MANIFEST_KIND, BODY, [manifest_key]), Envelope)
    sig = bytearray(envelope.sigs[0].sig)
    sig[10] ^= 0xFF
    forged = encode(
        Envelope(
            kind=MANIFEST_KIND,
            body=BODY,
            sigs=(Signature(key=manifest_key.id, sig=bytes(sig)),),
        )
    )
    reason = _open_rejection(forged, kind=MANIFEST_KIND, allowed=_allowed(manifest_key))
    assert reason is Reason.BAD_SIGNATURE


def test_signature_by_an_attacker_claiming_an_allowed_key_id_is_rejected_bad_signature(
    manifest_key: KeyPair,
) -> None:
    attacker = KeyPair.generate()
    to_sign = b"edgefleet/v1/" + MANIFEST_KIND.encode() + b"\0" + BODY
    forged = encode(
        Envelope(
            kind=MANIFEST_KIND,
            body=BODY,
            sigs=(Signature(key=manifest_key.id, sig=attacker.sign(to_sign)),),
        )
    )
    reason = _open_rejection(forged, kind=MANIFEST_KIND, allowed=_allowed(manifest_key))
    assert reason is Reason.BAD_SIGNATURE


def test_signature_by_a_key_not_allowed_is_rejected_unknown_key(manifest_key: KeyPair) -> None:
    attacker = KeyPair.generate()
    data = seal(MANIFEST_KIND, BODY, [attacker])
    reason = _open_rejection(data, kind=MANIFEST_KIND, allowed=_allowed(manifest_key))
    assert reason is Reason.UNKNOWN_KEY


def test_envelope_without_signatures_is_rejected_unsigned(manifest_key: KeyPair) -> None:
    unsigned = encode(Envelope(kind=MANIFEST_KIND, body=BODY, sigs=()))
    reason = _open_rejection(unsigned, kind=MANIFEST_KIND, allowed=_allowed(manifest_key))
    assert reason is Reason.UNSIGNED


def test_signatures_stripped_from_a_sealed_envelope_is_rejected_unsigned(
    manifest_key: KeyPair,
) -> None:
    envelope = decode(seal(MANIFEST_KIND, BODY, [manifest_key]), Envelope)
    stripped = encode(Envelope(kind=envelope.kind, body=envelope.body, sigs=()))
    reason = _open_rejection(stripped, kind=MANIFEST_KIND, allowed=_allowed(manifest_key))
    assert reason is Reason.UNSIGNED


def test_envelope_of_another_kind_is_rejected_wrong_kind(
    manifest_key: KeyPair, operator_key: KeyPair
) -> None:
    spec = seal(ROLLOUT_SPEC_KIND, BODY, [operator_key])
    allowed = _allowed(manifest_key, operator_key)
    assert _open_rejection(spec, kind=MANIFEST_KIND, allowed=allowed) is Reason.WRONG_KIND


@pytest.mark.parametrize(
    ("signed_as", "presented_as"),
    [
        (ROLLOUT_SPEC_KIND, MANIFEST_KIND),
        (MANIFEST_KIND, TRUST_KIND),
        (TRUST_KIND, MANIFEST_KIND),
        (MANIFEST_KIND, MANIFEST_KIND + "x"),
    ],
)
def test_body_rewrapped_under_another_kind_keeps_no_valid_signature(
    signed_as: str, presented_as: str
) -> None:
    # One key allowed for both kinds: only domain separation stops the cross-kind replay.
    key = KeyPair.generate()
    rewrapped = _rewrap(seal(signed_as, BODY, [key]), kind=presented_as)
    reason = _open_rejection(rewrapped, kind=presented_as, allowed=_allowed(key))
    assert reason is Reason.BAD_SIGNATURE


def test_signature_over_the_body_alone_without_domain_is_rejected_bad_signature() -> None:
    key = KeyPair.generate()
    raw_sig = encode(
        Envelope(kind=MANIFEST_KIND, body=BODY, sigs=(Signature(key=key.id, sig=key.sign(BODY)),))
    )
    assert _open_rejection(raw_sig, kind=MANIFEST_KIND, allowed=_allowed(key)) is (
        Reason.BAD_SIGNATURE
    )


def test_threshold_two_with_one_valid_signature_is_rejected() -> None:
    first, second = KeyPair.generate(), KeyPair.generate()
    data = seal(MANIFEST_KIND, BODY, [first])
    allowed = _allowed(first, second)
    assert _open_rejection(data, kind=MANIFEST_KIND, allowed=allowed, threshold=2) is (
        Reason.UNSIGNED
    )


def test_threshold_two_with_one_valid_and_one_unknown_signature_is_rejected() -> None:
    first, second, stranger = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
    data = seal(MANIFEST_KIND, BODY, [first, stranger])
    allowed = _allowed(first, second)
    with pytest.raises(SignatureError):
        open_envelope(data, kind=MANIFEST_KIND, allowed=allowed, threshold=2)


def test_threshold_two_met_by_two_distinct_allowed_keys() -> None:
    first, second = KeyPair.generate(), KeyPair.generate()
    data = seal(MANIFEST_KIND, BODY, [second, first])
    assert open_envelope(data, kind=MANIFEST_KIND, allowed=_allowed(first, second), threshold=2)


def test_same_key_signing_twice_counts_once_toward_the_threshold() -> None:
    first, second = KeyPair.generate(), KeyPair.generate()
    data = seal(MANIFEST_KIND, BODY, [first, first])
    allowed = _allowed(first, second)
    assert _open_rejection(data, kind=MANIFEST_KIND, allowed=allowed, threshold=2) is (
        Reason.UNSIGNED
    )


def test_one_signature_duplicated_in_the_envelope_counts_once_toward_the_threshold() -> None:
    first, second = KeyPair.generate(), KeyPair.generate()
    envelope = decode(seal(MANIFEST_KIND, BODY, [first]), Envelope)
    padded = encode(Envelope(kind=MANIFEST_KIND, body=BODY, sigs=envelope.sigs * MAX_SIGNATURES))
    allowed = _allowed(first, second)
    assert _open_rejection(padded, kind=MANIFEST_KIND, allowed=allowed, threshold=2) is (
        Reason.UNSIGNED
    )


def test_envelope_with_more_signatures_than_the_cap_is_rejected_schema() -> None:
    key = KeyPair.generate()
    envelope = decode(seal(MANIFEST_KIND, BODY, [key]), Envelope)
    # Built with model_construct: seal() itself would never produce this.
    flood = encode(
        Envelope.model_construct(
            kind=MANIFEST_KIND, body=BODY, sigs=envelope.sigs * (MAX_SIGNATURES + 1)
        )
    )
    with pytest.raises(MalformedPayloadError) as info:
        open_envelope(flood, kind=MANIFEST_KIND, allowed=_allowed(key))
    assert info.value.reason is Reason.SCHEMA


def test_oversized_envelope_is_rejected_before_any_signature_check() -> None:
    key = KeyPair.generate()
    data = seal(MANIFEST_KIND, b"\x00" * 4096, [key])
    with pytest.raises(MalformedPayloadError) as info:
        open_envelope(data, kind=MANIFEST_KIND, allowed=_allowed(key), max_bytes=1024)
    assert info.value.reason is Reason.OVERSIZED


def test_garbage_instead_of_an_envelope_is_rejected_malformed() -> None:
    key = KeyPair.generate()
    with pytest.raises(MalformedPayloadError) as info:
        open_envelope(b"\xc1garbage", kind=MANIFEST_KIND, allowed=_allowed(key))
    assert info.value.reason is Reason.MALFORMED


def test_seal_without_signers_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        seal(MANIFEST_KIND, BODY, [])


def test_key_pair_survives_pem_and_key_id_matches_public_bytes() -> None:
    key = KeyPair.generate()
    again = KeyPair.from_pem(key.private_pem())
    assert again.id == key.id
    assert key_id(public_from_raw(public_raw(key.public))) == key.id
    assert len(key.id) == 32
    assert key.id != KeyPair.generate().id


def test_pem_of_a_non_ed25519_key_is_a_usage_error() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(UsageError):
        KeyPair.from_pem(pem)
