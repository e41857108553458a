"""An edgefleet home: the keys, CA, accounts and enrolled devices of one fleet.

Layout (private files are mode 0600 and never belong in a repository)::

    keys/root.key keys/manifest.key keys/operator.key   Ed25519 signing keys
    keys/trust.signed                                   the root-signed TrustDoc
    ca/ca.key ca/ca.crt ca/server.key ca/server.crt     TLS material
    accounts.json                                       broker passwords of services
    roles.json                                          role of each extra account
    broker.json                                         broker host and ports
    devices.json                                        enrolled devices: id -> class
    revoked.json                                        revoked devices: class, serial
    devices/<id>/                                        one enrollment bundle each
    broker/                                             ``edgefleet broker up``'s broker
    coordinator-data/                                   ``coordinator run``'s store

The broker forces every client id to the account name, so each account is one session at
a time: the coordinator, the operator's commands (``operator``) and status readers
(``watcher``, read-only) each have their own account, and tools that run beside them get
accounts of their own (:meth:`Home.add_account`).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, get_args

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.bundle import Bundle
from broker.acl import Accounts, DeviceGrant, render_acl, render_password_file
from broker.config import BrokerPorts
from broker.launcher import BrokerMaterial, reload_running, running_pid, update_files
from broker.pki import (
    cert_serial,
    issue_client_cert,
    issue_server_cert,
    make_ca,
    make_crl,
    write_private,
    write_public,
)
from broker.session import ConnectRefused, Endpoint, Session, TransportError
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
    topics,
)
from schemas.topics import DeviceChannel, check_name

__all__ = ["ACCOUNT_ROLES", "DEFAULT_PORTS", "Enrollment", "Home", "Membership"]

DEFAULT_PORTS: Final = BrokerPorts(devices=8883, services=8884, websockets=8885)
_TRUST_TTL_S: Final = 365 * 24 * 3600.0
COORDINATOR: Final = "coordinator"
OPERATOR: Final = "operator"
DASHBOARD: Final = "dashboard"
WATCHER: Final = "watcher"
"""Read-only account of ``rollout status``, so watching never displaces ``rollout start``."""
AccountRole = Literal["admin", "operator", "dashboard"]
ACCOUNT_ROLES: Final[tuple[AccountRole, ...]] = get_args(AccountRole)
_FIXED_ROLES: Final[dict[str, AccountRole | Literal["coordinator"]]] = {
    COORDINATOR: "coordinator",
    OPERATOR: "operator",
    DASHBOARD: "dashboard",
    WATCHER: "dashboard",
}
_ENROLL_THREADS: Final = 8
"""Bundles written at once by :meth:`Home.enroll_many`."""
_EVICT_TIMEOUT_S: Final = 10.0
"""How long a revocation waits for the broker to reload before it gives up on eviction."""


@dataclass(frozen=True)
class Enrollment:
    """One device enrolled in the home, and whether its certificate is revoked."""

    device_id: str
    hw_class: str
    revoked: bool


@dataclass(frozen=True)
class Membership:
    """What a membership change did on the running broker."""

    reloaded: bool
    """A broker runs from the home's ``broker/`` folder and was told to reload."""
    evicted: bool = False
    """(revoke) The device's connection was ended and its retained topics cleared."""


@dataclass(frozen=True)
class _Issuer:
    """What every bundle of one enrollment is made from, read once."""

    root: Path
    ca_key: bytes
    ca_cert: bytes
    root_keys: dict[str, str]
    host: str
    port: int

    @classmethod
    def of(cls, home: Home) -> _Issuer:
        root = KeyPair.from_pem((home.root / "keys" / "root.key").read_bytes())
        host, ports = home.broker()
        return cls(
            root=home.root,
            ca_key=(home.root / "ca" / "ca.key").read_bytes(),
            ca_cert=(home.root / "ca" / "ca.crt").read_bytes(),
            root_keys={root.id: public_raw(root.public).hex()},
            host=host,
            port=ports.devices,
        )

    def bundle(self, wanted: tuple[str, str]) -> Path:
        """Issue a device's certificate and write its bundle folder (blocking)."""
        device_id, hw_class = wanted
        folder = self.root / "devices" / device_id
        key, cert = issue_client_cert(self.ca_key, self.ca_cert, device_id)
        write_private(folder / "device.key", key)
        write_public(folder / "device.crt", cert)
        write_public(folder / "ca.crt", self.ca_cert)
        bundle = Bundle(
            device_id=device_id,
            hw_class=hw_class,
            root_keys=self.root_keys,
            broker_host=self.host,
            broker_port=self.port,
        )
        write_public(folder / "bundle.json", bundle.dump())
        return folder


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
        accounts = {name: secrets.token_urlsafe(24) for name in _FIXED_ROLES}
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

    def enroll(self, device_id: str, hw_class: str, *, classes: Collection[str] = ()) -> Path:
        """Issue a device's certificate and write its bundle folder. When ``classes`` is
        given, ``hw_class`` must be one of them (the classes some profile defines).

        Raises:
            ValueError: a bad id or class; UsageError: the id is taken (by a device, a
                revoked device or an account), or the class is not among ``classes``.
        """
        (folder,) = self.enroll_many([(device_id, hw_class)], classes=classes)
        return folder

    def enroll_many(
        self, wanted: Sequence[tuple[str, str]], *, classes: Collection[str] = ()
    ) -> list[Path]:
        """Enroll each ``(device id, class)`` of ``wanted`` as :meth:`enroll` does, with
        the keys read once and ``devices.json`` written once, after every bundle (a
        crash in between leaves bundle folders that no device list names, and which a
        later enrollment of those ids writes again). Every id is checked before
        anything is written. Returns the bundle folders, in order.

        Raises:
            ValueError: a bad id or class; UsageError: an id is taken (by a device, a
                revoked device, an account or twice in ``wanted``), or a class is not
                among ``classes``.
        """
        if not wanted:
            return []
        devices = self.devices()
        taken = devices.keys() | self._revoked().keys() | self._accounts().keys()
        for device_id, hw_class in wanted:
            check_name(device_id, "device id")
            check_name(hw_class, "class")
            if classes and hw_class not in classes:
                known = ", ".join(sorted(classes))
                msg = f"no profile defines class {hw_class!r}; known: {known}"
                raise UsageError(msg[:500])
            if device_id in taken:
                msg = f"device id {device_id!r} is taken"
                raise UsageError(msg)
            taken.add(device_id)
        issuer = _Issuer.of(self)
        # Each bundle is four durable writes: overlapped in threads (fsync lets go of
        # the GIL), they take a fraction of the time one after another takes.
        with ThreadPoolExecutor(_ENROLL_THREADS) as pool:
            folders = list(pool.map(issuer.bundle, wanted))
        devices |= dict(wanted)
        write_public(self.root / "devices.json", json.dumps(devices, indent=2).encode())
        return folders

    def revoke(self, device_id: str) -> None:
        """Revoke a device: it leaves the ACL and its certificate enters the CRL. Apply
        it to a running broker with :meth:`apply_membership` and :meth:`evict`.

        Raises:
            UsageError: the device is not enrolled, or already revoked.
        """
        devices = self.devices()
        revoked = self._revoked()
        if device_id in revoked:
            msg = f"device {device_id!r} is already revoked"
            raise UsageError(msg)
        if device_id not in devices:
            msg = f"no enrolled device {device_id!r}"
            raise UsageError(msg[:200])
        serial = cert_serial((self.root / "devices" / device_id / "device.crt").read_bytes())
        revoked[device_id] = {"class": devices.pop(device_id), "serial": serial}
        # The revocation first: a crash in between leaves the device in both files, and
        # devices() leaves revoked ones out, so it is never active and unrevoked.
        write_public(self.root / "revoked.json", json.dumps(revoked, indent=2).encode())
        write_public(self.root / "devices.json", json.dumps(devices, indent=2).encode())

    def add_account(self, name: str, role: AccountRole) -> str:
        """Add a password account with ``role``'s rights; returns its password. Apply it
        to a running broker with :meth:`apply_membership`.

        Raises:
            ValueError: a malformed name or unknown role; UsageError: the name is taken.
        """
        check_name(name, "account name")
        if role not in ACCOUNT_ROLES:
            msg = f"unknown role {role!r}; use one of {', '.join(ACCOUNT_ROLES)}"
            raise ValueError(msg)
        accounts = self._accounts()
        if name in accounts or name in self.devices() or name in self._revoked():
            msg = f"name {name!r} is taken"
            raise UsageError(msg)
        accounts[name] = secrets.token_urlsafe(24)
        roles = self._roles()
        roles[name] = role
        write_private(self.root / "accounts.json", json.dumps(accounts, indent=2).encode())
        write_public(self.root / "roles.json", json.dumps(roles, indent=2).encode())
        return accounts[name]

    # -- the running broker ----------------------------------------------------------

    @property
    def broker_folder(self) -> Path:
        """Where ``edgefleet broker up`` runs Mosquitto (config, ACL, CRL, pid, data)."""
        return self.root / "broker"

    def apply_membership(self, *, revoking: Mapping[str, str] | None = None) -> Membership:
        """Write the ACL, password file and CRL into the home's broker folder and make a
        broker running there reload them (SIGHUP): nobody else is disconnected. Does
        nothing when no broker was ever set up there (``broker up`` writes all files).

        ``revoking`` maps device ids to one-shot passwords of their revoking accounts.
        """
        if not (self.broker_folder / "acl").exists():
            return Membership(reloaded=False)
        material = self.broker_material(revoking=revoking)
        update_files(
            self.broker_folder, acl=material.acl, passwords=material.passwords, crl=material.crl
        )
        return Membership(reloaded=reload_running(self.broker_folder))

    async def evict(self, device_id: str) -> Membership:
        """After :meth:`revoke`: end the device's live connection and clear its retained
        topics on the broker running from the home, then drop the one-shot account.

        A temporary password account named like the device (allowed only to write its
        five channels) logs in on the services listener. The broker binds client ids to
        account names, so that login replaces the device's connection (its Will fires);
        the account then publishes empty retained payloads on the channels, and is
        removed again. The coordinator's own session is never touched.

        Raises:
            UsageError: the device is not revoked.
            TransportError: the broker did not accept the account within 10 s.
        """
        if device_id not in self._revoked():
            msg = f"device {device_id!r} is not revoked"
            raise UsageError(msg)
        if running_pid(self.broker_folder) is None:
            return self.apply_membership()
        password = secrets.token_urlsafe(24)
        self.apply_membership(revoking={device_id: password})
        endpoint = self._endpoint(device_id, password, websockets=False)
        try:
            async with asyncio.timeout(_EVICT_TIMEOUT_S):
                await _clear_as(endpoint, device_id)
        except TimeoutError:
            msg = f"the broker did not reload within {_EVICT_TIMEOUT_S:g} s"
            raise TransportError(msg) from None
        finally:
            self.apply_membership()
        return Membership(reloaded=True, evicted=True)

    # -- reading -------------------------------------------------------------------

    def devices(self) -> dict[str, str]:
        """Enrolled devices that are not revoked: id -> class."""
        data: dict[str, str] = json.loads((self.root / "devices.json").read_text())
        revoked = self._revoked()
        return {d: c for d, c in data.items() if d not in revoked}

    def is_revoked(self, device_id: str) -> bool:
        return device_id in self._revoked()

    def enrollments(self) -> list[Enrollment]:
        """Every device ever enrolled, revoked ones included, by id."""
        found = [Enrollment(d, c, revoked=False) for d, c in self.devices().items()]
        found += [
            Enrollment(d, str(entry["class"]), revoked=True) for d, entry in self._revoked().items()
        ]
        return sorted(found, key=lambda e: e.device_id)

    def _revoked(self) -> dict[str, dict[str, str | int]]:
        path = self.root / "revoked.json"
        if not path.exists():
            return {}
        data: dict[str, dict[str, str | int]] = json.loads(path.read_text())
        return data

    def _roles(self) -> dict[str, AccountRole]:
        path = self.root / "roles.json"
        if not path.exists():
            return {}
        data: dict[str, AccountRole] = json.loads(path.read_text())
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

    def accounts(self) -> Accounts:
        """The password accounts by role: the fixed ones, then those added."""
        roles: dict[str, str] = {
            name: role for name, role in _FIXED_ROLES.items() if name in self._accounts()
        }
        roles |= self._roles()
        by_role: dict[str, tuple[str, ...]] = {}
        for name, role in roles.items():
            by_role[role] = (*by_role.get(role, ()), name)
        return Accounts(
            coordinator=COORDINATOR,
            admins=by_role.get("admin", ()),
            operators=by_role.get("operator", ()),
            dashboards=by_role.get("dashboard", ()),
        )

    def crl(self) -> bytes:
        """The CA's revocation list of every revoked device certificate."""
        serials = [int(entry["serial"]) for entry in self._revoked().values()]
        ca_key = (self.root / "ca" / "ca.key").read_bytes()
        return make_crl(ca_key, (self.root / "ca" / "ca.crt").read_bytes(), serials)

    def broker_material(self, *, revoking: Mapping[str, str] | None = None) -> BrokerMaterial:
        """What the broker needs from this home. ``revoking`` adds one-shot accounts
        (device id -> password) that may only clear those devices' channels."""
        revoking = dict(revoking or {})
        grants = [DeviceGrant(device_id=d, hw_class=c) for d, c in self.devices().items()]
        accounts = self.accounts()
        if revoking:
            accounts = Accounts(
                coordinator=accounts.coordinator,
                admins=accounts.admins,
                operators=accounts.operators,
                dashboards=accounts.dashboards,
                revoking=tuple(revoking),
            )
        return BrokerMaterial(
            ca_cert=(self.root / "ca" / "ca.crt").read_bytes(),
            server_key=(self.root / "ca" / "server.key").read_bytes(),
            server_cert=(self.root / "ca" / "server.crt").read_bytes(),
            acl=render_acl(grants, accounts),
            passwords=render_password_file(self._accounts() | revoking),
            crl=self.crl(),
        )

    def service_endpoint(self, account: str) -> Endpoint:
        """How a service account (coordinator, operator, dashboard, ...) reaches the
        broker: dashboards over secure WebSockets, the others on the services listener.

        Raises:
            UsageError: the home has no such account.
        """
        accounts = self._accounts()
        if account not in accounts:
            msg = (
                f"no account {account!r} in {self.root / 'accounts.json'}; add it with"
                f" 'edgefleet account add {account} --role ROLE'"
            )
            raise UsageError(msg[:300])
        return self._endpoint(account, accounts[account], websockets=account == DASHBOARD)

    def _endpoint(self, username: str, password: str, *, websockets: bool) -> Endpoint:
        host, ports = self.broker()
        return Endpoint(
            host=host,
            port=ports.websockets if websockets else ports.services,
            ca_file=self.root / "ca" / "ca.crt",
            username=username,
            password=password,
            transport="websockets" if websockets else "tcp",
        )


async def _clear_as(endpoint: Endpoint, device_id: str) -> None:
    """Log in as the revoking account (replacing the device's connection) and clear the
    device's channels. Right after a SIGHUP the broker may still hold the old password
    file, so a refused login is retried (the caller bounds the time)."""
    while True:
        try:
            async with Session(endpoint, client_id=device_id, connect_timeout=2.0) as session:
                for channel in DeviceChannel:
                    await session.publish(topics.device(device_id, channel), b"", retain=True)
        except ConnectRefused:
            await asyncio.sleep(0.1)
            continue
        return
