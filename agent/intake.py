"""Trust and manifest intake, pure: signed bytes in, what they change out.

Like python-tuf's ``TrustedMetadataSet``, the :class:`Intake` owns the state its checks
depend on (the trust held, the seq applied) and reads no clock and no disk: ``now`` is
passed in, and the service persists what an accepted document changed. The checks
themselves are :class:`schemas.TrustedState`'s, in their fixed order.

A retained message comes again on every reconnect. Bytes already judged (accepted or
rejected) are recognised by their digest and cost nothing, so a flapping link neither
re-verifies them nor floods the device's events. The last manifest rejected is kept and
verified again once the trust changes (keys rotated: it may verify now).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.events import Desired
from schemas import EventKind, Manifest, Reason, RejectedError, TrustDoc, TrustedState

__all__ = ["Intake", "ManifestTaken", "Outcome", "Refused", "Restored", "TrustTaken"]


@dataclass(frozen=True)
class TrustTaken:
    """A TrustDoc verified and now held; ``payload`` is to be kept."""

    doc: TrustDoc
    payload: bytes


@dataclass(frozen=True)
class ManifestTaken:
    """A manifest verified and applied; ``payload`` and its seq are to be kept."""

    manifest: Manifest
    payload: bytes
    desired: Desired


@dataclass(frozen=True)
class Refused:
    """Signed bytes rejected (to be told in an event and the state)."""

    kind: EventKind
    reason: Reason
    detail: str


Outcome = TrustTaken | ManifestTaken | Refused


@dataclass(frozen=True)
class Restored:
    """What the kept trust and manifest still give after a restart."""

    desired: Desired | None
    problems: tuple[str, ...]
    """Why a kept document no longer verifies (for the log)."""


def _digest(payload: bytes) -> bytes:
    return hashlib.sha256(payload).digest()


@dataclass
class _Judged:
    """Digests of the document held and of the last one rejected."""

    held: bytes | None = None
    rejected: bytes | None = None

    def __contains__(self, digest: bytes) -> bool:
        return digest in (self.held, self.rejected)


class Intake:
    """The verifier of one device: its trust, its applied seq, what it judged."""

    def __init__(
        self, root_keys: Mapping[str, Ed25519PublicKey], *, hw_class: str, device_id: str
    ) -> None:
        self._trusted = TrustedState(root_keys)
        self._hw_class = hw_class
        self._device_id = device_id
        self._applied_seq = 0
        self._trust = _Judged()
        self._manifest = _Judged()
        self._pending_manifest: bytes | None = None
        """The last manifest rejected: verified again after a trust change."""

    @property
    def trust_version(self) -> int:
        return self._trusted.trust_version

    @property
    def applied_seq(self) -> int:
        return self._applied_seq

    def restore(
        self, *, trust: bytes | None, manifest: bytes | None, applied_seq: int, now: float
    ) -> Restored:
        """Take back what was kept before a restart. The kept bytes count as judged
        even when they no longer verify (their redelivery is no news); the manifest
        is verified against the seq below its own, as it was applied."""
        self._applied_seq = applied_seq
        problems: list[str] = []
        if trust is not None:
            self._trust.held = _digest(trust)
            try:
                self._trusted.update_trust(trust, now=now)
            except RejectedError as exc:
                problems.append(f"stored trust no longer valid: {exc}")
        if manifest is None:
            return Restored(None, tuple(problems))
        self._manifest.held = _digest(manifest)
        try:
            doc = self._verify(manifest, applied_seq - 1, now)
        except RejectedError as exc:
            problems.append(f"stored manifest no longer valid: {exc}")
            return Restored(None, tuple(problems))
        return Restored(self._desired(doc), tuple(problems))

    def trust(self, payload: bytes, *, now: float) -> list[Outcome]:
        """Judge a TrustDoc; once one is taken, the manifest rejected last is judged
        again (empty: bytes judged before)."""
        digest = _digest(payload)
        if digest in self._trust:
            return []
        try:
            doc = self._trusted.update_trust(payload, now=now)
        except RejectedError as exc:
            self._trust.rejected = digest
            return [Refused(EventKind.TRUST_REJECTED, exc.reason, exc.detail)]
        self._trust = _Judged(held=digest)
        out: list[Outcome] = [TrustTaken(doc, payload)]
        pending, self._pending_manifest = self._pending_manifest, None
        if pending is not None:
            self._manifest.rejected = None  # keys changed: it may verify now
            out += self.manifest(pending, now=now)
        return out

    def manifest(self, payload: bytes, *, now: float) -> list[Outcome]:
        """Judge a class manifest (empty: bytes judged before)."""
        digest = _digest(payload)
        if digest in self._manifest:
            return []
        try:
            doc = self._verify(payload, self._applied_seq, now)
        except RejectedError as exc:
            self._pending_manifest = payload
            self._manifest.rejected = digest
            return [Refused(EventKind.MANIFEST_REJECTED, exc.reason, exc.detail)]
        self._pending_manifest = None
        self._manifest = _Judged(held=digest)
        self._applied_seq = doc.seq
        return [ManifestTaken(doc, payload, self._desired(doc))]

    def _verify(self, payload: bytes, applied_seq: int, now: float) -> Manifest:
        return self._trusted.verify_manifest(
            payload, hw_class=self._hw_class, applied_seq=applied_seq, now=now
        )

    def _desired(self, manifest: Manifest) -> Desired:
        picked = manifest.target_for(self._device_id)
        return Desired(picked.release, picked.rollout_id, manifest.seq)
