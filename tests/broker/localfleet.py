"""Building blocks for tests that need a real broker (plain classes, no pytest import; test-only).

Other packages' fixtures build on these: a :class:`LocalFleet` holds the PKI, the accounts,
a :class:`~broker.launcher.MosquittoBroker` on free ports and ready-made
:class:`~broker.session.Endpoint` values for each kind of party.

    with broker_tempdir() as tmp, LocalFleet(tmp, devices=[DeviceGrant("d1", "cls")]) as fleet:
        async with Session(fleet.device_endpoint("d1"), client_id="d1") as s: ...
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from broker.acl import Accounts, DeviceGrant, render_acl, render_password_file
from broker.config import BrokerPorts
from broker.launcher import BrokerMaterial, MosquittoBroker
from broker.pki import (
    issue_client_cert,
    issue_server_cert,
    make_ca,
    make_crl,
    write_private,
    write_public,
)
from broker.session import Endpoint

__all__ = ["FleetPKI", "LocalFleet", "broker_tempdir"]


@contextlib.contextmanager
def broker_tempdir(prefix: str = "edgefleet-broker-") -> Iterator[Path]:
    """A temp dir Mosquitto can reach after dropping root privileges; removed afterwards.

    pytest's ``tmp_path`` lives under a 0700 directory owned by root, which the
    ``mosquitto`` account cannot traverse; ``mkdtemp`` in /tmp plus 0755 can be.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True, kw_only=True)
class FleetPKI:
    """A CA and a broker certificate for localhost / 127.0.0.1."""

    ca_key: bytes
    ca_cert: bytes
    server_key: bytes
    server_cert: bytes

    @classmethod
    def generate(cls, common_name: str = "edgefleet test CA") -> FleetPKI:
        """Make a fresh CA and server certificate."""
        ca_key, ca_cert = make_ca(common_name)
        server_key, server_cert = issue_server_cert(ca_key, ca_cert)
        return cls(ca_key=ca_key, ca_cert=ca_cert, server_key=server_key, server_cert=server_cert)

    def client_cert(self, common_name: str) -> tuple[bytes, bytes]:
        """Issue a client certificate (``key_pem, cert_pem``) with CN ``common_name``."""
        return issue_client_cert(self.ca_key, self.ca_cert, common_name)

    def crl(self, revoked: Sequence[int] = ()) -> bytes:
        """A CRL of this CA naming the ``revoked`` certificate serials."""
        return make_crl(self.ca_key, self.ca_cert, revoked)


class LocalFleet:
    """A broker in ``folder`` with the fleet's ACL, accounts and client credentials.

    Every service account's password is ``"<name>-secret"`` unless ``passwords`` says
    otherwise. Client cert/key files are written under ``folder/clients/<id>/``.
    """

    def __init__(
        self,
        folder: Path,
        *,
        devices: Sequence[DeviceGrant] = (),
        accounts: Accounts | None = None,
        passwords: Mapping[str, str] | None = None,
        pki: FleetPKI | None = None,
        ports: BrokerPorts | None = None,
        run_as: str | None = None,
    ) -> None:
        self.folder = folder
        self.devices = list(devices)
        self.accounts = accounts or Accounts()
        self.passwords = dict(passwords or {n: f"{n}-secret" for n in self.accounts.names()})
        self.pki = pki or FleetPKI.generate()
        material = BrokerMaterial(
            ca_cert=self.pki.ca_cert,
            server_key=self.pki.server_key,
            server_cert=self.pki.server_cert,
            acl=render_acl(self.devices, self.accounts),
            passwords=render_password_file(self.passwords),
            crl=self.pki.crl(),
        )
        self.broker = MosquittoBroker(
            folder=folder / "broker", material=material, ports=ports, run_as=run_as
        )
        self._clients = folder / "clients"

    def __enter__(self) -> Self:
        self.broker.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.broker.stop()

    def add_device(self, grant: DeviceGrant) -> None:
        """Enroll another device and make the running broker reload its ACL."""
        self.devices.append(grant)
        self.broker.reload(acl=render_acl(self.devices, self.accounts))

    def device_endpoint(self, device_id: str, *, pki: FleetPKI | None = None) -> Endpoint:
        """mTLS endpoint (devices listener) with a fresh cert for ``device_id``.

        ``pki`` issues the client cert from another CA (to test refusal).
        """
        key, cert = (pki or self.pki).client_cert(device_id)
        folder = self._clients / device_id
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        write_private(folder / "client.key", key)
        write_public(folder / "client.crt", cert)
        return Endpoint(
            host=self.broker.host,
            port=self.broker.ports.devices,
            ca_file=self.broker.ca_file,
            cert_file=folder / "client.crt",
            key_file=folder / "client.key",
        )

    def service_endpoint(self, username: str, *, password: str | None = None) -> Endpoint:
        """Password endpoint on the services listener (coordinator, operators)."""
        return Endpoint(
            host=self.broker.host,
            port=self.broker.ports.services,
            ca_file=self.broker.ca_file,
            username=username,
            password=self.passwords.get(username, "") if password is None else password,
        )

    def dashboard_endpoint(self, username: str | None = None) -> Endpoint:
        """Password endpoint on the secure WebSockets listener."""
        name = username or self.accounts.dashboards[0]
        return Endpoint(
            host=self.broker.host,
            port=self.broker.ports.websockets,
            ca_file=self.broker.ca_file,
            username=name,
            password=self.passwords.get(name, ""),
            transport="websockets",
        )
