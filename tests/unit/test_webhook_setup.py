"""Webhook certificates (cryptography) and the webhook configurations (pure builder)."""

from __future__ import annotations

import base64
import datetime as dt
import ssl
from pathlib import Path

from cryptography import x509

from finetune_operator.builders.webhooks import build_webhook_configurations
from finetune_operator.tls import ensure_certificates, make_certificates, service_names

NOW = dt.datetime(2026, 12, 2, tzinfo=dt.UTC)


def test_certificate_is_signed_by_the_ca_for_every_name_and_loads_into_tls(tmp_path: Path) -> None:
    names = [*service_names("finetune-system/finetune-operator"), "127.0.0.1"]
    cert_pem, key_pem, ca_pem = make_certificates(names, NOW)
    cert, ca = x509.load_pem_x509_certificate(cert_pem), x509.load_pem_x509_certificate(ca_pem)
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == names[:3]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    (tmp_path / "c.pem").write_bytes(cert_pem)
    (tmp_path / "k.pem").write_bytes(key_pem)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")  # what kopf's server does


def test_certificates_are_kept_while_valid_and_renewed_before_expiry_or_on_new_names(tmp_path: Path) -> None:
    files, made = ensure_certificates(tmp_path, ["127.0.0.1"], NOW)
    assert made
    assert oct(files.key.stat().st_mode & 0o777) == "0o600"
    first = files.cert.read_bytes()
    assert ensure_certificates(tmp_path, ["127.0.0.1"], NOW + dt.timedelta(days=300)) == (files, False)
    assert files.cert.read_bytes() == first
    _, made = ensure_certificates(tmp_path, ["127.0.0.1"], NOW + dt.timedelta(days=340))
    assert made
    _, made = ensure_certificates(tmp_path, ["127.0.0.1", "webhook.example"], NOW + dt.timedelta(days=340))
    assert made


def test_configurations_fail_closed_for_create_update_and_open_for_delete() -> None:
    validating, mutating = build_webhook_configurations(
        "fto", ca_pem=b"CA", url="https://127.0.0.1:9443", namespaces=["team-b", "team-a"], timeout_seconds=7
    )
    hooks = {h["name"]: h for h in validating["webhooks"] + mutating["webhooks"]}
    assert set(hooks) == {
        "validate-finetunejob.fto.finetune.dev",
        "validate-modeldeployment.fto.finetune.dev",
        "audit-delete.fto.finetune.dev",
        "set-created-by.fto.finetune.dev",
    }
    for name, hook in hooks.items():
        operations = {op for rule in hook["rules"] for op in rule["operations"]}
        assert hook["failurePolicy"] == ("Ignore" if operations == {"DELETE"} else "Fail"), name
        assert "DELETE" not in operations or hook["failurePolicy"] == "Ignore"
        assert all("/" not in r for rule in hook["rules"] for r in rule["resources"]), "no status subresource"
        assert hook["timeoutSeconds"] == 7
        assert hook["sideEffects"] == "NoneOnDryRun"
        assert hook["clientConfig"]["url"] == f"https://127.0.0.1:9443/{name.split('.')[0]}"
        assert base64.b64decode(hook["clientConfig"]["caBundle"]) == b"CA"
        assert hook["namespaceSelector"]["matchExpressions"][0]["values"] == ["team-a", "team-b"]
    assert {
        op for rule in hooks["set-created-by.fto.finetune.dev"]["rules"] for op in rule["operations"]
    } == {"CREATE"}


def test_in_cluster_configurations_call_the_service_and_serve_all_namespaces() -> None:
    validating, _ = build_webhook_configurations("fto", ca_pem=b"CA", service="finetune-system/fto-webhook")
    hook = validating["webhooks"][0]
    assert hook["clientConfig"]["service"] == {
        "namespace": "finetune-system",
        "name": "fto-webhook",
        "port": 443,
        "path": "/validate-finetunejob",
    }
    assert hook["namespaceSelector"] == {}
