"""The TrustDoc: which keys may sign what.

Signed by the root key(s); lists the keys of each role. Devices start from the root
public keys in their enrollment bundle and accept a new TrustDoc only when the
current root role signed it and its version is higher (key rotation).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import Field, model_validator

from schemas.codec import WireModel
from schemas.envelope import key_id, public_from_raw

__all__ = ["TRUST_KIND", "Role", "RoleKeys", "TrustDoc"]

TRUST_KIND: Final = "trust"


class Role(StrEnum):
    ROOT = "root"
    MANIFEST = "manifest"
    OPERATOR = "operator"


class RoleKeys(WireModel):
    keys: tuple[str, ...] = Field(min_length=1, max_length=8)
    threshold: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _threshold_reachable(self) -> RoleKeys:
        if self.threshold > len(set(self.keys)):
            msg = f"threshold {self.threshold} above {len(set(self.keys))} keys"
            raise ValueError(msg)
        return self


class TrustDoc(WireModel):
    version: int = Field(ge=1)
    issued_at: float
    expires_at: float
    keys: dict[str, bytes]
    """Key id -> raw Ed25519 public key (32 bytes)."""
    roles: dict[Role, RoleKeys]

    @model_validator(mode="after")
    def _consistent(self) -> TrustDoc:
        for kid, raw in self.keys.items():
            if len(raw) != 32 or key_id(public_from_raw(raw)) != kid:
                msg = f"key {kid} does not match its public bytes"
                raise ValueError(msg)
        for role in Role:
            if role not in self.roles:
                msg = f"role {role.value} missing"
                raise ValueError(msg)
            missing = set(self.roles[role].keys) - self.keys.keys()
            if missing:
                msg = f"role {role.value} names unknown keys {sorted(missing)}"
                raise ValueError(msg)
        return self

    def keys_for(self, role: Role) -> dict[str, Ed25519PublicKey]:
        return {kid: public_from_raw(self.keys[kid]) for kid in self.roles[role].keys}
