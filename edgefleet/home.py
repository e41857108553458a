"""An edgefleet home: the keys, CA, accounts and enrolled devices of one fleet.

Layout (private files are mode 0600 and never belong in a repository)::

    keys/root.key keys/manifest.key keys/operator.key   Ed25519 signing keys
    keys/trust.signed                                   the root-signed TrustDoc
    ca/ca.key ca/ca.crt ca/server.key ca/server.crt     TLS material
    accounts.json                                       broker passwords of services
    broker.json                                         broker host and ports
    devices/<id>/                                        one enrollment bundle each
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.bundle import Bundle
from broker.acl import Accounts, DeviceGrant, render_acl, render_password_file
from broker.config import BrokerPorts
from broker.launcher import BrokerMaterial
from broker.pki import issue_client_cert, issue_server_cert, make_ca, write_private, write_public
from broker.session import Endpoint
from schemas import (
    TRUST_KIND,
    KeyPair,
    Role,
    RoleKeys,
    TrustDoc,
    UsageError,
    encode,
    public_raw,
    seal,
)
from schemas.topics import check_name

__all__ = ["DEFAULT_PORTS", "Home"]

DEFAULT_PORTS: Final = BrokerPorts(devices=8883, services=8884, websockets=8885)
_TRUST_TTL_S: Final = 365 * 24 * 3600.0
COORDINATOR: Final = "coordinator"
OPERATOR: Final = "operator"
DASHBOARD: Final = "dashboard"


@dataclass(frozen=True)
class Home:
    root: Path

    # -- creation ----------------------------------------------------------------

    @classmethod
    def init(
        cls, root: Path, *, host: str = "127.0.0.1", ports: BrokerPorts = DEFAULT_PORTS
    ) -> Home:
        """Create keys, CA, accounts and the first TrustDoc.

        Raises:
            UsageError: ``root`` already holds a home.
        """
        home = cls(root)
        if (root / "keys" / "root.key").exists():
            msg = f"{root} already holds an edgefleet home"
            raise UsageError(msg)
        keys = {role: KeyPair.generate() for role in Role}
        for role, pair in keys.items():
            write_private(root / "keys" / f"{role.value}.key", pair.private_pem())
        now = time.time()
        trust = TrustDoc(
            version=1,
            issued_at=now,
            expires_at=now + _TRUST_TTL_S,
            keys={pair.id: public_raw(pair.public) for pair in keys.values()},
            roles={role: RoleKeys(keys=(pair.id,)) for role, pair in keys.items()},
        )
        write_public(
            root / "keys" / "trust.signed", seal(TRUST_KIND, encode(trust), [keys[Role.ROOT]])
        )
        ca_key, ca_cert = make_ca()
        write_private(root / "ca" / "ca.key", ca_key)
        write_public(root / "ca" / "ca.crt", ca_cert)
        server_key, server_cert = issue_server_cert(ca_key, ca_cert, hostnames=("localhost", host))
        write_private(root / "ca" / "server.key", server_key)
        write_public(root / "ca" / "server.crt", server_cert)
        accounts = {name: secrets.token_urlsafe(24) for name in (COORDINATOR, OPERATOR, DASHBOARD)}
        write_private(root / "accounts.json", json.dumps(accounts, indent=2).encode())
        home.set_broker(host, ports)
        write_public(root / "devices.json", b"{}")
        return home

    def set_broker(self, host: str, ports: BrokerPorts) -> None:
        data = {
            "host": host,
            "devices": ports.devices,
            "services": ports.services,
            "websockets": ports.websockets,
        }
        write_public(self.root / "broker.json", json.dumps(data, indent=2).encode())

    def enroll(self, device_id: str, hw_class: str) -> Path:
        """Issue a device's certificate and write its bundle folder.

        Raises:
            ValueError: a bad id or class; UsageError: the id is taken.
        """
        check_name(device_id, "device id")
        check_name(hw_class, "class")
        devices = self.devices()
        if device_id in devices or device_id in (COORDINATOR, OPERATOR, DASHBOARD):
            msg = f"device id {device_id!r} is taken"
            raise UsageError(msg)
        folder = self.root / "devices" / device_id
        ca_key = (self.root / "ca" / "ca.key").read_bytes()
        ca_cert = (self.root / "ca" / "ca.crt").read_bytes()
        key, cert = issue_client_cert(ca_key, ca_cert, device_id)
        write_private(folder / "device.key", key)
        write_public(folder / "device.crt", cert)
        write_public(folder / "ca.crt", ca_cert)
        root = KeyPair.from_pem((self.root / "keys" / "root.key").read_bytes())
        host, ports = self.broker()
        bundle = Bundle(
            device_id=device_id,
            hw_class=hw_class,
            root_keys={root.id: public_raw(root.public).hex()},
            broker_host=host,
            broker_port=ports.devices,
        )
        write_public(folder / "bundle.json", bundle.dump())
        devices[device_id] = hw_class
        write_public(self.root / "devices.json", json.dumps(devices, indent=2).encode())
        return folder

    # -- reading -------------------------------------------------------------------

    def devices(self) -> dict[str, str]:
        data: dict[str, str] = json.loads((self.root / "devices.json").read_text())
        return data

    def broker(self) -> tuple[str, BrokerPorts]:
        data = json.loads((self.root / "broker.json").read_text())
        ports = BrokerPorts(
            devices=data["devices"], services=data["services"], websockets=data["websockets"]
        )
        return data["host"], ports

    def key(self, role: Role) -> KeyPair:
        return KeyPair.from_pem((self.root / "keys" / f"{role.value}.key").read_bytes())

    def trust(self) -> bytes:
        return (self.root / "keys" / "trust.signed").read_bytes()

    def root_public_keys(self) -> dict[str, Ed25519PublicKey]:
        root = self.key(Role.ROOT)
        return {root.id: root.public}

    def _accounts(self) -> dict[str, str]:
        data: dict[str, str] = json.loads((self.root / "accounts.json").read_text())
        return data

    def broker_material(self) -> BrokerMaterial:
        grants = [DeviceGrant(device_id=d, hw_class=c) for d, c in self.devices().items()]
        accounts = Accounts(coordinator=COORDINATOR, operators=(OPERATOR,), dashboards=(DASHBOARD,))
        return BrokerMaterial(
            ca_cert=(self.root / "ca" / "ca.crt").read_bytes(),
            server_key=(self.root / "ca" / "server.key").read_bytes(),
            server_cert=(self.root / "ca" / "server.crt").read_bytes(),
            acl=render_acl(grants, accounts),
            passwords=render_password_file(self._accounts()),
        )

    def service_endpoint(self, account: str) -> Endpoint:
        """How a service account (coordinator, operator, dashboard) reaches the broker."""
        host, ports = self.broker()
        websockets = account == DASHBOARD
        return Endpoint(
            host=host,
            port=ports.websockets if websockets else ports.services,
            ca_file=self.root / "ca" / "ca.crt",
            username=account,
            password=self._accounts()[account],
            transport="websockets" if websockets else "tcp",
        )
