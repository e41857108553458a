"""TLS material for the broker and its clients (a private CA, server and client certs).

EC P-256 keys, SHA-256 signatures. Private keys are written 0600 and atomically so a crash
never leaves a half-written or world-readable key behind.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from storage import atomic_write

__all__ = [
    "cert_serial",
    "issue_client_cert",
    "issue_server_cert",
    "make_ca",
    "make_crl",
    "write_private",
    "write_public",
]

_CA_DAYS = 3650
_LEAF_DAYS = 825  # the longest validity common TLS clients still accept for leaf certs
_BACKDATE = dt.timedelta(minutes=5)  # tolerate clock skew between issuer and verifier
# OpenSSL refuses *every* client certificate once the CRL's nextUpdate has passed, so the
# CRL lives as long as the CA; a revocation rewrites it anyway.
_CRL_DAYS = _CA_DAYS


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_ca(
    ca_key_pem: bytes, ca_cert_pem: bytes
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        msg = "CA key must be an EC private key"
        raise TypeError(msg)
    return key, x509.load_pem_x509_certificate(ca_cert_pem)


def make_ca(common_name: str = "edgefleet CA") -> tuple[bytes, bytes]:
    """Create a self-signed CA. Returns ``(key_pem, cert_pem)``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def _issue(
    ca_key_pem: bytes,
    ca_cert_pem: bytes,
    *,
    common_name: str,
    usage: x509.ObjectIdentifier,
    sans: list[x509.GeneralName],
) -> tuple[bytes, bytes]:
    ca_key, ca_cert = _load_ca(ca_key_pem, ca_cert_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=_LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def issue_server_cert(
    ca_key_pem: bytes,
    ca_cert_pem: bytes,
    *,
    hostnames: Iterable[str] = ("localhost",),
    ips: Iterable[str] = ("127.0.0.1",),
) -> tuple[bytes, bytes]:
    """Issue the broker's TLS certificate (serverAuth) for ``hostnames`` and ``ips``.

    Returns ``(key_pem, cert_pem)``. Clients check the hostname against the SANs.

    Raises:
        ValueError: an entry of ``ips`` is not an IP address, or no name was given.
    """
    names = list(hostnames)
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    if not sans:
        msg = "a server certificate needs at least one hostname or IP"
        raise ValueError(msg)
    cn = names[0] if names else str(sans[0].value)
    return _issue(
        ca_key_pem, ca_cert_pem, common_name=cn, usage=ExtendedKeyUsageOID.SERVER_AUTH, sans=sans
    )


def issue_client_cert(
    ca_key_pem: bytes, ca_cert_pem: bytes, common_name: str
) -> tuple[bytes, bytes]:
    """Issue a client certificate (clientAuth) whose CN is ``common_name`` (a device id).

    The broker's devices listener uses the CN as the MQTT username, so the ACL applies to it.
    Returns ``(key_pem, cert_pem)``.
    """
    return _issue(
        ca_key_pem,
        ca_cert_pem,
        common_name=common_name,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        sans=[],
    )


def cert_serial(cert_pem: bytes) -> int:
    """The serial number of a PEM certificate (what a CRL names).

    Raises:
        ValueError: ``cert_pem`` is not a PEM certificate.
    """
    return x509.load_pem_x509_certificate(cert_pem).serial_number


def make_crl(ca_key_pem: bytes, ca_cert_pem: bytes, revoked: Iterable[int] = ()) -> bytes:
    """A PEM certificate revocation list, signed by the CA, naming the ``revoked`` serials.

    The broker's devices listener loads it (``crlfile``): a listed certificate can no
    longer connect. An empty list is valid and needed, since the listener always loads one.
    """
    ca_key, ca_cert = _load_ca(ca_key_pem, ca_cert_pem)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - _BACKDATE)
        .next_update(now + dt.timedelta(days=_CRL_DAYS))
    )
    for serial in sorted(set(revoked)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now - _BACKDATE)
            .build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.PEM)


def write_private(path: Path, data: bytes) -> None:
    """Atomically write secret ``data`` (a private key) to ``path`` with mode 0600.

    Raises:
        OSError: the directory is not writable.
    """
    atomic_write(path, data, mode=0o600)


def write_public(path: Path, data: bytes) -> None:
    """Atomically write ``data`` (a certificate, a config) to ``path`` with mode 0644.

    Raises:
        OSError: the directory is not writable.
    """
    atomic_write(path, data, mode=0o644)
