"""TLS certificates for a deployment's own links: a private CA and one server certificate.

``fedround certs init --out DIR --host prefect.example.org --host 10.0.0.5`` writes

    ca.crt      the CA's certificate: give it to every client (sites, operators) to trust
    ca.key      the CA's private key (0600): keep it offline, it signs new server certs
    server.crt  the server certificate, its subject alternative names the hosts given
    server.key  the server's private key (0600): mount it into the TLS endpoints only

The server certificate serves every endpoint of the coordinator (the TLS proxy in front of
Prefect and MLflow, MinIO): one name per host clients use. An IP address given as a host
becomes an IP SAN. Existing files are never overwritten: a CA already there signs a new
server certificate (``--renew``), so clients keep trusting the same ``ca.crt``.

Built on ``cryptography`` (ECDSA P-256, SHA-256); a deployment with its own PKI (an
organisation CA, cert-manager) uses that instead and only needs the same four roles.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedround.tasks.core.errors import ConfigError

# Browsers and Apple clients refuse server certificates valid for more than 398 days.
MAX_SERVER_DAYS = 397
CA_DAYS = 3650


@dataclass(frozen=True)
class TLSFiles:
    """Where :func:`make_certificates` put the CA and the server certificate."""

    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path


def tls_files(out_dir: Path) -> TLSFiles:
    return TLSFiles(
        ca_cert=out_dir / "ca.crt",
        ca_key=out_dir / "ca.key",
        cert=out_dir / "server.crt",
        key=out_dir / "server.key",
    )


def make_certificates(
    out_dir: Path, hosts: Sequence[str], days: int = MAX_SERVER_DAYS, *, renew: bool = False
) -> TLSFiles:
    """Write a CA (unless ``out_dir`` holds one) and a server certificate for ``hosts``.

    Raises :class:`ConfigError` for no host, an invalid host name, ``days`` outside
    1..397, or a server certificate already in ``out_dir`` without ``renew``.
    """
    names = _check_hosts(hosts)
    if not 1 <= days <= MAX_SERVER_DAYS:
        raise ConfigError(f"--days must be between 1 and {MAX_SERVER_DAYS}, not {days}")
    files = tls_files(out_dir)
    if files.cert.exists() and not renew:
        raise ConfigError(
            f"{files.cert} exists: pass --renew to replace the server certificate "
            "(the CA is kept, so clients need nothing new)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    if files.ca_cert.exists() != files.ca_key.exists():
        raise ConfigError(
            f"{out_dir} holds only one of ca.crt and ca.key: restore the other, or move both "
            "away to start a new CA (every client must then trust the new ca.crt)"
        )
    if files.ca_cert.exists():
        ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        loaded = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{files.ca_key} is not an EC private key written by fedround")
        ca_key = loaded
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _ca_certificate(ca_key)
        _write_key(files.ca_key, ca_key)
        files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _server_certificate(key, names, ca_cert, ca_key, days)
    _write_key(files.key, key)
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


def certificate_hosts(cert_file: Path) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n) for n in names.get_values_for_type(x509.DNSName)] + [
        str(ip) for ip in names.get_values_for_type(x509.IPAddress)
    ]


def _check_hosts(hosts: Sequence[str]) -> list[x509.GeneralName]:
    if not hosts:
        raise ConfigError("give at least one --host: the names clients use to reach the servers")
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        labels = host.split(".")
        if not all(
            label and len(label) <= 63 and (label.replace("-", "").isalnum() or label == "*")
            for label in labels
        ):
            raise ConfigError(f"{host!r} is neither a host name nor an IP address")
        names.append(x509.DNSName(host.lower()))
    return names


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedround deployment CA")])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=CA_DAYS))
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


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    names: list[x509.GeneralName],
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    days: int,
) -> x509.Certificate:
    first = names[0].value
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(first))]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, 0o600)
