"""The dev cluster's certificates and kubeconfig (ECDSA via `cryptography`)."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hack.devcluster.layout import SERVICE_CIDR, Layout
from hack.kube import Api


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def issue_certificate(
    subject: str,
    *,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    usage: x509.ObjectIdentifier | None = None,
    organization: str | None = None,
    sans: Sequence[str] = (),
    days: int = 365,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """An ECDSA P-256 certificate: a CA when `usage` is None, else a leaf signed by `issuer` (self-signed
    without one). `sans` are DNS names or IP addresses. Also used by tests for webhook servers."""
    key = ec.generate_private_key(ec.SECP256R1())
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, subject)]
    if organization:
        attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    name = x509.Name(attributes)
    signer_cert, signer_key = issuer if issuer else (None, key)
    is_ca = usage is None
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(signer_cert.subject if signer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=False,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(s) for s in sans]), critical=False
        )
    return builder.sign(signer_key, hashes.SHA256()), key


def _general_name(san: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(san))
    except ValueError:
        return x509.DNSName(san)


def pem(obj: x509.Certificate | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def ensure_pki(pki: Path) -> None:
    """One CA; a serving certificate for the apiserver; an admin client certificate (system:masters);
    an RSA key that signs service-account tokens. Made once and kept across restarts."""
    if (pki / "sa.key").exists():
        return
    pki.mkdir(parents=True, exist_ok=True)
    ca = issue_certificate("finetune-operator-dev-ca", days=3650)
    sans = [
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
        "127.0.0.1",
        str(ipaddress.ip_network(SERVICE_CIDR)[1]),  # the `kubernetes` Service's ClusterIP
    ]
    files = {
        "ca": ca,
        "apiserver": issue_certificate(
            "kube-apiserver", issuer=ca, usage=ExtendedKeyUsageOID.SERVER_AUTH, sans=sans
        ),
        "admin": issue_certificate(
            "kubernetes-admin",
            issuer=ca,
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
            organization="system:masters",
        ),
    }
    for name, (cert, key) in files.items():
        (pki / f"{name}.crt").write_bytes(pem(cert))
        (pki / f"{name}.key").write_bytes(pem(key))
        (pki / f"{name}.key").chmod(0o600)
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (pki / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    (pki / "sa.key").write_bytes(pem(sa_key))  # written last: its presence means the PKI is complete
    (pki / "sa.key").chmod(0o600)


def write_kubeconfig(layout: Layout, api_url: str) -> None:
    def b64(name: str) -> str:
        return base64.b64encode((layout.pki / name).read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "fto-dev",
                "cluster": {"server": api_url, "certificate-authority-data": b64("ca.crt")},
            }
        ],
        "users": [
            {
                "name": "fto-dev-admin",
                "user": {
                    "client-certificate-data": b64("admin.crt"),
                    "client-key-data": b64("admin.key"),
                },
            }
        ],
        "contexts": [{"name": "fto-dev", "context": {"cluster": "fto-dev", "user": "fto-dev-admin"}}],
        "current-context": "fto-dev",
    }
    tmp = layout.kubeconfig.with_suffix(".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
    tmp.chmod(0o600)
    tmp.replace(layout.kubeconfig)


def admin_api(layout: Layout, api_url: str) -> Api:
    """The dev cluster's API as its admin (client certificate in system:masters)."""
    return Api.from_files(api_url, layout.pki / "ca.crt", layout.pki / "admin.crt", layout.pki / "admin.key")
