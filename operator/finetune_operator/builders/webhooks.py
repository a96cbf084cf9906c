"""The admission webhook configurations (pure). Why each setting is what it is:

- `failurePolicy: Fail` on CREATE/UPDATE of our two kinds: a request the operator could not review is not
  stored (fail closed), so nothing the trainer can't run slips in while the operator restarts. Only our
  kinds are matched, never Pods or other built-ins, so a down operator can't block the cluster.
- DELETE goes to a separate webhook with `failurePolicy: Ignore` that always allows and only records the
  request in the audit log: a down operator never blocks a delete (nor its finalizer's cleanup).
- No webhook matches `/status` (rules name the main resource only): status writes by the operator and
  the trainer never wait for admission.
- `timeoutSeconds` (default 10): a review makes a few GETs; a short timeout keeps `kubectl apply` from
  hanging for the API server's 30 s maximum when the operator is wedged.
- `sideEffects: NoneOnDryRun`: the only side effect is the audit record, skipped for dry runs.
- `matchPolicy: Equivalent`, `admissionReviewVersions: [v1]`.
- `namespaceSelector`: the namespaces the operator serves (all when it serves all).
- The mutating webhook (CREATE only) sets `finetune.dev/created-by`; `reinvocationPolicy: Never`.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Mapping, Sequence
from typing import Any

from finetune_operator.api.common import GROUP, VERSION
from finetune_operator.api.finetunejob import PLURAL as FINETUNEJOBS
from finetune_operator.api.modeldeployment import PLURAL as MODELDEPLOYMENTS

ADMISSION_API = "admissionregistration.k8s.io/v1"

VALIDATE_FINETUNEJOB = "validate-finetunejob"
VALIDATE_MODELDEPLOYMENT = "validate-modeldeployment"
AUDIT_DELETE = "audit-delete"
SET_CREATED_BY = "set-created-by"
"""Handler ids: the last segment of each webhook's path (kopf routes by it); DNS-1123 as the API requires."""


def _rule(operations: Sequence[str], plurals: Sequence[str]) -> dict[str, Any]:
    return {
        "apiGroups": [GROUP],
        "apiVersions": [VERSION],
        "operations": list(operations),
        "resources": list(plurals),
        "scope": "Namespaced",
    }


def _client_config(handler_id: str, ca_pem: bytes, url: str | None, service: str | None) -> dict[str, Any]:
    bundle = base64.b64encode(ca_pem).decode()
    if service:
        namespace, name = service.split("/", 1)
        ref = {"namespace": namespace, "name": name, "port": 443, "path": f"/{handler_id}"}
        return {"service": ref, "caBundle": bundle}
    if not url:
        raise ValueError("a webhook needs a URL or a Service")
    return {"url": f"{url.rstrip('/')}/{handler_id}", "caBundle": bundle}


def _namespace_selector(namespaces: Sequence[str]) -> dict[str, Any]:
    if not namespaces:
        return {}
    return {
        "matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": sorted(namespaces)}
        ]
    }


def _webhook(
    handler_id: str,
    name: str,
    rules: Sequence[Mapping[str, Any]],
    *,
    fail: bool,
    ca_pem: bytes,
    url: str | None,
    service: str | None,
    namespaces: Sequence[str],
    timeout_seconds: int,
) -> dict[str, Any]:
    return {
        "name": f"{handler_id}.{name}.{GROUP}",
        "clientConfig": _client_config(handler_id, ca_pem, url, service),
        "rules": list(rules),
        "failurePolicy": "Fail" if fail else "Ignore",
        "matchPolicy": "Equivalent",
        "namespaceSelector": _namespace_selector(namespaces),
        "sideEffects": "NoneOnDryRun",
        "timeoutSeconds": timeout_seconds,
        "admissionReviewVersions": ["v1"],
    }


def build_webhook_configurations(
    name: str,
    *,
    ca_pem: bytes,
    url: str | None = None,
    service: str | None = None,
    namespaces: Sequence[str] = (),
    timeout_seconds: int = 10,
) -> list[dict[str, Any]]:
    """[ValidatingWebhookConfiguration, MutatingWebhookConfiguration], both named `name`."""
    hook = functools.partial(
        _webhook,
        name=name,
        ca_pem=ca_pem,
        url=url,
        service=service,
        namespaces=namespaces,
        timeout_seconds=timeout_seconds,
    )
    labels = {"app.kubernetes.io/name": "finetune-operator", "app.kubernetes.io/component": "webhook"}
    both = [FINETUNEJOBS, MODELDEPLOYMENTS]
    validating = {
        "apiVersion": ADMISSION_API,
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name, "labels": labels},
        "webhooks": [
            hook(VALIDATE_FINETUNEJOB, rules=[_rule(["CREATE", "UPDATE"], [FINETUNEJOBS])], fail=True),
            hook(
                VALIDATE_MODELDEPLOYMENT, rules=[_rule(["CREATE", "UPDATE"], [MODELDEPLOYMENTS])], fail=True
            ),
            hook(AUDIT_DELETE, rules=[_rule(["DELETE"], both)], fail=False),
        ],
    }
    mutating_hook = hook(SET_CREATED_BY, rules=[_rule(["CREATE"], both)], fail=True)
    mutating_hook["reinvocationPolicy"] = "Never"
    mutating = {
        "apiVersion": ADMISSION_API,
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name, "labels": labels},
        "webhooks": [mutating_hook],
    }
    return [validating, mutating]
