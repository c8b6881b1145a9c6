"""Throwaway PKI for loopback HTTPS: a CA, a server certificate for 127.0.0.1/localhost and a client
certificate for service-principal certificate authentication."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class TLSFiles:
    ca: Path  # CA certificate (PEM): pass as connection_verify / REQUESTS_CA_BUNDLE
    cert: Path  # server certificate chain (leaf + CA), PEM
    key: Path  # server private key, PEM, unencrypted
    client_cert: Path  # client certificate only, PEM
    client_key: Path  # client private key only, PEM
    client_bundle: Path  # client key + certificate in one PEM (what CertificateCredential reads)
    client_thumbprint_sha1: str  # hex, upper case, as Entra shows it
    client_thumbprint_sha256: str


def _key() -> rsa.RSAPrivateKey:
    # 2048 bits: the smallest size current OpenSSL security levels and msal accept.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, mode: int = 0o644) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    return path


def make_tls(directory: os.PathLike[str] | str, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> TLSFiles:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    # Back-date so a freshly issued certificate is valid even if clocks disagree slightly.
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    later = now + dt.timedelta(days=7)

    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gighive-media-agent test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(later)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))

    server_key = _key()
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(later)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    client_key = _key()
    client_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gighive-media-agent test client")]))
        .issuer_name(ca_name)
        .public_key(client_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(later)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    ca_pem = ca_cert.public_bytes(pem)
    client_pem = client_cert.public_bytes(pem)
    return TLSFiles(
        ca=_write(d / "ca.pem", ca_pem),
        cert=_write(d / "server.pem", server_cert.public_bytes(pem) + ca_pem),
        key=_write(d / "server-key.pem", _pem_key(server_key), 0o600),
        client_cert=_write(d / "client.pem", client_pem),
        client_key=_write(d / "client-key.pem", _pem_key(client_key), 0o600),
        client_bundle=_write(d / "client-bundle.pem", _pem_key(client_key) + client_pem, 0o600),
        client_thumbprint_sha1=client_cert.fingerprint(hashes.SHA1()).hex().upper(),  # noqa: S303
        client_thumbprint_sha256=client_cert.fingerprint(hashes.SHA256()).hex().upper(),
    )
