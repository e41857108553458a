"""The enrollment bundle a device is provisioned with.

Written once by ``edgefleet device enroll``; everything the agent needs to reach the
broker and to start trusting: its id and class, the root public keys, and its TLS
client certificate (CN = device id).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field

from schemas import key_id, public_from_raw

__all__ = ["BUNDLE_FILE", "Bundle"]

BUNDLE_FILE: Final = "bundle.json"


class Bundle(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    device_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    hw_class: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    root_keys: dict[str, str]
    """Key id -> raw Ed25519 public key, hex."""
    broker_host: str
    broker_port: int
    ca_file: str = "ca.crt"
    cert_file: str = "device.crt"
    key_file: str = "device.key"

    @classmethod
    def load(cls, folder: Path) -> Bundle:
        """Raises: OSError, ValueError (pydantic) on a missing or bad bundle."""
        return cls.model_validate(json.loads((folder / BUNDLE_FILE).read_text()))

    def dump(self) -> bytes:
        return self.model_dump_json(indent=2).encode()

    def root_public_keys(self) -> dict[str, Ed25519PublicKey]:
        """Raises: ValueError when a key does not match its id."""
        keys = {kid: public_from_raw(bytes.fromhex(raw)) for kid, raw in self.root_keys.items()}
        for kid, key in keys.items():
            if key_id(key) != kid:
                msg = f"root key {kid} does not match its public bytes"
                raise ValueError(msg)
        return keys
