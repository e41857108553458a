"""Signed envelopes: ``{kind, body: bytes, sigs: [{key, sig}]}``.

The signature (Ed25519) covers ``b"edgefleet/v1/" + kind + b"\\0" + body`` so a
signature made for one kind of document can never validate another. The body is
signed and verified as the exact bytes received: it is decoded only after a
signature from an allowed key checked out, and never re-encoded for checking.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pydantic import Field

from schemas.codec import MAX_MESSAGE_BYTES, WireModel, decode, encode
from schemas.errors import Reason, SignatureError, UsageError

__all__ = [
    "Envelope",
    "KeyPair",
    "Signature",
    "key_id",
    "open_envelope",
    "public_from_raw",
    "public_raw",
    "seal",
]

_DOMAIN: Final = b"edgefleet/v1/"
MAX_SIGNATURES: Final = 8


class Signature(WireModel):
    key: str = Field(min_length=16, max_length=64)
    sig: bytes = Field(min_length=64, max_length=64)


class Envelope(WireModel):
    kind: str = Field(min_length=1, max_length=32)
    body: bytes
    sigs: tuple[Signature, ...] = Field(max_length=MAX_SIGNATURES)


def public_raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_from_raw(raw: bytes) -> Ed25519PublicKey:
    """Raises: ValueError when ``raw`` is not a 32-byte Ed25519 public key."""
    return Ed25519PublicKey.from_public_bytes(raw)


def key_id(key: Ed25519PublicKey) -> str:
    """A key's id: the first 16 bytes of the sha256 of its raw public bytes, in hex."""
    return hashlib.sha256(public_raw(key)).hexdigest()[:32]


@dataclass(frozen=True)
class KeyPair:
    """An Ed25519 signing key with its id. Private bytes never leave this object
    except through :meth:`private_pem`, for writing a 0600 key file."""

    private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes) -> KeyPair:
        """Raises: UsageError when ``pem`` is not an unencrypted Ed25519 private key."""
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            msg = "not an Ed25519 private key"
            raise UsageError(msg)
        return cls(key)

    def private_pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    @property
    def id(self) -> str:
        return key_id(self.public)

    def sign(self, message: bytes) -> bytes:
        return self.private.sign(message)


def _signed_bytes(kind: str, body: bytes) -> bytes:
    return _DOMAIN + kind.encode() + b"\0" + body


def seal(kind: str, body: bytes, signers: Sequence[KeyPair]) -> bytes:
    """Sign ``body`` (already-encoded bytes) as ``kind`` and return the envelope bytes."""
    if not signers:
        msg = "seal needs at least one signer"
        raise UsageError(msg)
    to_sign = _signed_bytes(kind, body)
    sigs = tuple(Signature(key=k.id, sig=k.sign(to_sign)) for k in signers)
    return encode(Envelope(kind=kind, body=body, sigs=sigs))


def open_envelope(
    data: bytes,
    *,
    kind: str,
    allowed: Mapping[str, Ed25519PublicKey],
    threshold: int = 1,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> bytes:
    """Verify an envelope and return its body bytes, still undecoded.

    ``allowed`` maps key ids to the keys that may sign this kind. At least
    ``threshold`` distinct allowed keys must have signed.

    Raises:
        MalformedPayloadError: oversized or not an envelope.
        SignatureError: wrong kind, unsigned, signed only by unknown keys, or a
            signature that does not verify.
    """
    envelope = decode(data, Envelope, max_bytes=max_bytes)
    if envelope.kind != kind:
        raise SignatureError(Reason.WRONG_KIND, f"expected {kind!r}, got {envelope.kind!r}")
    if not envelope.sigs:
        raise SignatureError(Reason.UNSIGNED, f"{kind} carries no signature")
    to_verify = _signed_bytes(kind, envelope.body)
    good: set[str] = set()
    unknown: list[str] = []
    for sig in envelope.sigs:
        public = allowed.get(sig.key)
        if public is None:
            unknown.append(sig.key)
            continue
        try:
            public.verify(sig.sig, to_verify)
        except InvalidSignature as exc:
            raise SignatureError(
                Reason.BAD_SIGNATURE, f"{kind} signature by key {sig.key} does not verify"
            ) from exc
        good.add(sig.key)
    if len(good) < threshold:
        if not good and unknown:
            raise SignatureError(
                Reason.UNKNOWN_KEY, f"{kind} signed by keys not allowed for it: {unknown}"
            )
        raise SignatureError(
            Reason.UNSIGNED, f"{kind} has {len(good)} valid signatures, needs {threshold}"
        )
    return envelope.body
