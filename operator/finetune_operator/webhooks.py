"""The admission webhooks' services: certificates, kopf's HTTPS server, the webhook configurations, and
one review (fetch what the pure checks need, check, audit, answer). docs/webhooks.md says why each
setting is what it is; builders/webhooks.py builds the configurations.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import tempfile
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf

from finetune_operator.api.common import API_VERSION
from finetune_operator.api.finetunejob import KIND as FINETUNEJOB
from finetune_operator.api.modeldeployment import KIND as MODELDEPLOYMENT
from finetune_operator.audit.log import AuditLog
from finetune_operator.builders.webhooks import build_webhook_configurations
from finetune_operator.config import OperatorConfig
from finetune_operator.k8s import KubeClient
from finetune_operator.tls import CertificateFiles, ensure_certificates, service_names
from finetune_operator.validation import (
    ClusterView,
    Lookups,
    NodeOffer,
    Refusal,
    WebhookPolicy,
    lookups,
    refusal_text,
    review_finetunejob,
    review_modeldeployment,
)
from finetune_operator.validation.cluster import FineTuneJobFacts
from finetune_operator.validation.defaults import (
    DEFAULT_LOCAL_QUEUE,
    ClusterDefaults,
    default_storage_class,
    needs_cluster_defaults,
)
from finetune_operator.validation.review import spec_changed

logger = logging.getLogger(__name__)

REVIEWS = {FINETUNEJOB: review_finetunejob, MODELDEPLOYMENT: review_modeldeployment}
CERT_CHECK_SECONDS = 12 * 3600
"""How often the serving certificate's expiry is checked (renewed 30 days before, caBundle re-applied)."""


def policy_of(config: OperatorConfig) -> WebhookPolicy:
    return WebhookPolicy(
        allowed_model_schemes=config.webhook_allowed_model_schemes,
        allowed_dataset_schemes=config.webhook_allowed_data_schemes,
        check_gpu_shape=config.webhook_check_gpu_shape,
        shutdown_timeout_seconds=config.termination_grace_seconds - 30,
    )


@dataclass
class WebhookServices:
    client: KubeClient
    policy: WebhookPolicy
    audit: AuditLog | None


async def cluster_view(client: KubeClient, namespace: str, needed: Lookups) -> ClusterView:
    """Exactly the objects `needed` names. Secrets are reduced to their key names at once."""

    async def secret(name: str) -> tuple[str, frozenset[str] | None]:
        body = await client.get("v1", "Secret", name, namespace)
        return name, None if body is None else frozenset(
            (body.get("data") or {}) | (body.get("stringData") or {})
        )

    async def claim(name: str) -> tuple[str, bool]:
        return name, await client.get("v1", "PersistentVolumeClaim", name, namespace) is not None

    async def job(name: str) -> tuple[str, FineTuneJobFacts | None]:
        body = await client.get(API_VERSION, FINETUNEJOB, name, namespace)
        if body is None:
            return name, None
        status = body.get("status") or {}
        artifact = status.get("artifact") or {}
        return name, FineTuneJobFacts(
            task=str((body.get("spec") or {}).get("task", "")),
            phase=status.get("phase"),
            artifact_uri=artifact.get("claimUri") or artifact.get("uri"),
        )

    secrets, claims, jobs = await asyncio.gather(
        asyncio.gather(*(secret(n) for n in needed.secrets)),
        asyncio.gather(*(claim(n) for n in needed.claims)),
        asyncio.gather(*(job(n) for n in needed.finetunejobs)),
    )
    nodes = None
    if needed.nodes:
        listed = await client.list("v1", "Node")
        nodes = tuple(NodeOffer.from_node(node) for node in listed)
    return ClusterView(
        namespace=namespace,
        secrets={name: keys for name, keys in secrets if keys is not None},
        claims=frozenset(name for name, found in claims if found),
        finetunejobs={name: facts for name, facts in jobs if facts is not None},
        nodes=nodes,
    )


LOCAL_QUEUE_API = "kueue.x-k8s.io/v1beta2"


async def cluster_defaults(client: KubeClient, kind: str, body: Mapping[str, Any]) -> ClusterDefaults:
    """The cluster's defaults for what `body` left unset (validation/defaults.py); nothing else is read.
    A cluster without Kueue answers 404 for LocalQueues: no queue default."""
    wants_class, wants_queue = needs_cluster_defaults(kind, body)
    namespace = str((body.get("metadata") or {}).get("namespace", ""))
    storage_class = (
        default_storage_class(await client.list("storage.k8s.io/v1", "StorageClass")) if wants_class else None
    )
    queue = None
    if wants_queue and namespace:
        found = await client.get(LOCAL_QUEUE_API, "LocalQueue", DEFAULT_LOCAL_QUEUE, namespace)
        queue = DEFAULT_LOCAL_QUEUE if found is not None else None
    return ClusterDefaults(storage_class=storage_class, local_queue=queue)


async def review_request(
    services: WebhookServices,
    *,
    kind: str,
    operation: str,
    body: Mapping[str, Any],
    old: Mapping[str, Any] | None,
    userinfo: Mapping[str, Any],
    dryrun: bool,
) -> None:
    """Review one admission request; raises `kopf.AdmissionError` (HTTP 422, the message naming every
    refused field) to refuse it. Records the decision in the audit log (not for dry runs)."""
    new = dict(body)
    meta = new.get("metadata") or {}
    namespace, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
    refusals: list[Refusal] = []
    if operation != "DELETE":
        needed = lookups(kind, new) if spec_changed(new, old) else Lookups()
        view = await cluster_view(services.client, namespace, needed)
        refusals = REVIEWS[kind](new, old, view, services.policy)
    reason = refusal_text(kind, name, refusals) if refusals else ""
    if (
        services.audit is not None
        and not dryrun
        and (operation != "UPDATE" or refusals or spec_changed(new, old))
    ):
        # Allowed metadata-only UPDATEs (finalizers, annotations the operator keeps) aren't recorded: they
        # are the operator's own bookkeeping, recorded as its actions.
        current = old if operation == "DELETE" and old is not None else new
        services.audit.admission(
            verb=operation,
            user=str(userinfo.get("username", "")),
            groups=list(userinfo.get("groups") or []),
            kind=kind,
            namespace=namespace,
            name=name,
            uid=str((current.get("metadata") or {}).get("uid", "")),
            generation=(current.get("metadata") or {}).get("generation"),
            spec=current.get("spec"),
            old_spec=(old or {}).get("spec") if operation == "UPDATE" else None,
            allowed=not refusals,
            reason=reason,
        )
    if refusals:
        raise kopf.AdmissionError(reason, code=422)


def certificate_names(config: OperatorConfig) -> list[str]:
    names = service_names(config.webhook_service) if config.webhook_service else []
    return [*names, config.webhook_host] if config.webhook_host else names


def ensure_files(config: OperatorConfig) -> CertificateFiles:
    directory = Path(config.webhook_cert_dir or tempfile.mkdtemp(prefix="finetune-webhook-"))
    files, made = ensure_certificates(directory, certificate_names(config), dt.datetime.now(dt.UTC))
    if made:
        logger.info("webhook certificate made in %s (valid until %s)", directory, files.not_after())
    return files


def configure_server(
    settings: kopf.OperatorSettings, config: OperatorConfig, files: CertificateFiles
) -> None:
    settings.admission.server = kopf.WebhookServer(
        addr="0.0.0.0",
        port=config.webhook_port,
        host=config.webhook_host,
        certfile=str(files.cert),
        pkeyfile=str(files.key),
        cafile=str(files.ca),
    )
    settings.admission.managed = None  # builders/webhooks.py: our failurePolicy, timeouts, selectors


async def apply_configurations(
    client: KubeClient, config: OperatorConfig, files: CertificateFiles, namespaces: Sequence[str]
) -> None:
    url = None if config.webhook_service else f"https://{config.webhook_host}:{config.webhook_port}"
    for manifest in build_webhook_configurations(
        config.webhook_configuration_name,
        ca_pem=files.ca_pem,
        url=url,
        service=config.webhook_service or None,
        namespaces=namespaces,
        timeout_seconds=config.webhook_timeout_seconds,
    ):
        await client.apply(manifest)


async def keep_certificates_current(
    client: KubeClient, config: OperatorConfig, files: CertificateFiles, namespaces: Sequence[str]
) -> None:
    """Renew the certificate before it expires and re-apply the caBundle (kopf reloads the server when
    the files change)."""
    while True:
        await asyncio.sleep(CERT_CHECK_SECONDS)
        current, made = ensure_certificates(
            files.cert.parent, certificate_names(config), dt.datetime.now(dt.UTC)
        )
        if made and config.webhook_manage_configurations:
            await apply_configurations(client, config, current, namespaces)


async def start_webhooks(
    settings: kopf.OperatorSettings,
    config: OperatorConfig,
    client: KubeClient,
    audit: AuditLog | None,
    memo: Any,
    spawn: Callable[[Coroutine[Any, Any, Any]], None],
) -> None:
    """Certificates, kopf's server and (unless Helm owns them) the webhook configurations; from startup."""
    files = ensure_files(config)
    configure_server(settings, config, files)
    memo.webhooks = WebhookServices(client, policy_of(config), audit)
    if config.webhook_manage_configurations:
        await apply_configurations(client, config, files, config.namespaces)
        logger.info(
            "webhooks on :%d, configurations %r applied (namespaces: %s)",
            config.webhook_port,
            config.webhook_configuration_name,
            ", ".join(config.namespaces) or "all",
        )
    spawn(keep_certificates_current(client, config, files, config.namespaces))
