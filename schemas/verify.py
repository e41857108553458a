"""The one place untrusted signed documents become trusted objects.

Like python-tuf's ``TrustedMetadataSet``: pure (bytes and a clock reading in,
verified object or a typed :class:`~schemas.errors.RejectedError` out), no I/O, and
every check in a fixed order. For a manifest the order is:

1. a TrustDoc is held and has not expired (else nothing can be verified);
2. size and envelope shape;
3. signature by a key the current TrustDoc allows for the manifest role;
4. body schema;
5. hardware class is the device's own;
6. seq above the one applied (replay / rollback protection);
7. not expired (a frozen cloud cannot keep devices on stale orders forever).

A TrustDoc must be signed by the root role of the trust already held (the root keys
of the enrollment bundle at first) *and* by its own root role, carry a higher version
and not be expired.
"""

from __future__ import annotations

from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from schemas.codec import decode
from schemas.envelope import open_envelope
from schemas.errors import PolicyError, Reason
from schemas.manifest import MANIFEST_KIND, Manifest
from schemas.rollout import ROLLOUT_SPEC_KIND, RolloutSpec
from schemas.trust import TRUST_KIND, Role, TrustDoc

__all__ = ["TrustedState"]


class TrustedState:
    """Trusted keys held by a party, and the checks every signed document passes."""

    def __init__(self, root_keys: Mapping[str, Ed25519PublicKey]) -> None:
        if not root_keys:
            msg = "at least one root key is needed"
            raise ValueError(msg)
        self._root_keys = dict(root_keys)
        self._root_threshold = 1
        self._trust: TrustDoc | None = None
        self._role_keys: dict[Role, dict[str, Ed25519PublicKey]] = {}
        """The current TrustDoc's keys of each role, built once per document (not on
        every verification)."""

    @property
    def trust(self) -> TrustDoc | None:
        return self._trust

    @property
    def trust_version(self) -> int:
        return 0 if self._trust is None else self._trust.version

    def update_trust(self, data: bytes, *, now: float) -> TrustDoc:
        """Verify a TrustDoc and make it the current one.

        Raises:
            MalformedPayloadError, SignatureError, PolicyError: the document is
                rejected; the current trust is kept.
        """
        body = open_envelope(
            data, kind=TRUST_KIND, allowed=self._root_keys, threshold=self._root_threshold
        )
        doc = decode(body, TrustDoc)
        new_root = doc.roles[Role.ROOT]
        open_envelope(
            data, kind=TRUST_KIND, allowed=doc.keys_for(Role.ROOT), threshold=new_root.threshold
        )
        if doc.version <= self.trust_version:
            raise PolicyError(
                Reason.REPLAYED, f"trust version {doc.version} not above {self.trust_version}"
            )
        if doc.expires_at <= now:
            raise PolicyError(Reason.EXPIRED, f"trust version {doc.version} expired")
        self._trust = doc
        self._role_keys = {role: doc.keys_for(role) for role in Role}
        self._root_keys = self._role_keys[Role.ROOT]
        self._root_threshold = new_root.threshold
        return doc

    def _role(self, role: Role, now: float) -> tuple[dict[str, Ed25519PublicKey], int]:
        if self._trust is None:
            raise PolicyError(Reason.NOT_TRUSTED, "no trust document yet")
        if self._trust.expires_at <= now:
            raise PolicyError(Reason.EXPIRED, f"trust version {self._trust.version} has expired")
        return self._role_keys[role], self._trust.roles[role].threshold

    def verify_manifest(
        self, data: bytes, *, hw_class: str, applied_seq: int, now: float
    ) -> Manifest:
        """Verify a class manifest for a device of ``hw_class``.

        Raises:
            MalformedPayloadError, SignatureError, PolicyError: with the reason.
        """
        allowed, threshold = self._role(Role.MANIFEST, now)
        body = open_envelope(data, kind=MANIFEST_KIND, allowed=allowed, threshold=threshold)
        manifest = decode(body, Manifest)
        if manifest.hw_class != hw_class:
            raise PolicyError(
                Reason.WRONG_CLASS, f"manifest for {manifest.hw_class!r}, device is {hw_class!r}"
            )
        if manifest.seq <= applied_seq:
            raise PolicyError(
                Reason.REPLAYED, f"manifest seq {manifest.seq} not above applied {applied_seq}"
            )
        if manifest.expires_at <= now:
            raise PolicyError(
                Reason.EXPIRED, f"manifest seq {manifest.seq} expired at {manifest.expires_at:.0f}"
            )
        return manifest

    def verify_rollout_spec(self, data: bytes, *, now: float) -> RolloutSpec:
        """Verify an operator-signed rollout spec.

        Raises:
            MalformedPayloadError, SignatureError, PolicyError: with the reason.
        """
        allowed, threshold = self._role(Role.OPERATOR, now)
        body = open_envelope(data, kind=ROLLOUT_SPEC_KIND, allowed=allowed, threshold=threshold)
        return decode(body, RolloutSpec)
