"""The webhook server's certificates, made with `cryptography` (kopf's own self-signed path needs oscrypto,
which can't find OpenSSL 3's libcrypto; see notes on kopf).

A private CA (ECDSA P-256, 2 years) signs the serving certificate (1 year) for the names the API server
uses: `<service>.<namespace>.svc` in a cluster, or the host/IP given out of cluster. The CA goes into the
webhook configurations' `caBundle`. `ensure_certificates` keeps what it finds in the directory while it is
complete, matches the names and is valid for more than `RENEW_BEFORE`; otherwise it makes new files.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALIDITY = dt.timedelta(days=730)
CERT_VALIDITY = dt.timedelta(days=365)
RENEW_BEFORE = dt.timedelta(days=30)
CERT_FILE, KEY_FILE, CA_FILE = "tls.crt", "tls.key", "ca.crt"


@dataclass(frozen=True)
class CertificateFiles:
    cert: Path
    key: Path
    ca: Path

    @property
    def ca_pem(self) -> bytes:
        return self.ca.read_bytes()

    def not_after(self) -> dt.datetime:
        return x509.load_pem_x509_certificate(self.cert.read_bytes()).not_valid_after_utc


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_certificates(names: Sequence[str], now: dt.datetime) -> tuple[bytes, bytes, bytes]:
    """(cert PEM, key PEM, CA PEM) for `names` (DNS names or IP addresses). Pure apart from randomness."""
    if not names:
        raise ValueError("a serving certificate needs at least one name")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("finetune-operator webhook CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + CERT_VALIDITY)
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return cert.public_bytes(pem), _pem_key(key), ca.public_bytes(pem)


def _usable(files: CertificateFiles, names: Sequence[str], now: dt.datetime) -> bool:
    if not all(path.is_file() for path in (files.cert, files.key, files.ca)):
        return False
    try:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return False
    have = {str(v) for v in san.get_values_for_type(x509.DNSName)}
    have |= {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    return set(names) <= have and cert.not_valid_after_utc - now > RENEW_BEFORE


def ensure_certificates(
    directory: Path, names: Sequence[str], now: dt.datetime
) -> tuple[CertificateFiles, bool]:
    """The certificate files in `directory`, made anew if missing, wrong or close to expiry.
    Returns (files, made) where `made` says new files were written."""
    files = CertificateFiles(directory / CERT_FILE, directory / KEY_FILE, directory / CA_FILE)
    if _usable(files, names, now):
        return files, False
    cert, key, ca = make_certificates(names, now)
    directory.mkdir(parents=True, exist_ok=True)
    # Key first with 0600; the certificate last, since kopf reloads the server when it changes.
    fd = os.open(files.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
    files.ca.write_bytes(ca)
    files.cert.write_bytes(cert)
    return files, True


def service_names(service: str) -> list[str]:
    """`namespace/name` -> the names the API server may use for the Service."""
    namespace, name = service.split("/", 1)
    return [f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local", f"{name}.{namespace}"]
