"""kopf's startup hooks: one startup hook with every setting, the runtime in `memo`, cleanup, login, probe.

Importing this module registers all handlers (via `finetune_operator.handlers`). The one place where each
kind's reconciler is registered on the shared work queue (`RECONCILERS`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import kopf

from finetune_operator import handlers  # noqa: F401 - registers the handlers
from finetune_operator.api import finetunejob, modeldeployment
from finetune_operator.audit.log import AuditLog
from finetune_operator.audit.setup import start_audit
from finetune_operator.builders.common import JOB_LABEL
from finetune_operator.builders.serving_common import DEPLOYMENT_LABEL
from finetune_operator.config import OperatorConfig
from finetune_operator.controllers.finetunejob import reconcile_finetunejob
from finetune_operator.controllers.modeldeployment import reconcile_modeldeployment
from finetune_operator.controllers.runtime import Runtime
from finetune_operator.controllers.work_queue import ObjectKey, Reconcile
from finetune_operator.k8s import KubeClient
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.webhooks import start_webhooks

#: kopf's own finalizer and state. No kopf change handler, daemon or timer exists (every kind is reconciled
#: from the work queue), so kopf adds neither to our objects; and on every event kopf removes *this*
#: finalizer from an object that needs none, which is how ModelDeployments made by an older operator (kopf
#: change handlers, this finalizer) can still be deleted. A different name from ours
#: (builders.common.FINALIZER), so kopf never strips ours.
KOPF_FINALIZER = "kopf.finetune.dev/finalizer"
STORAGE_PREFIX = "kopf.finetune.dev"

ReconcilerOf = Callable[[Runtime, ObjectKey], Awaitable[float | None]]
RECONCILERS: dict[str, ReconcilerOf] = {
    finetunejob.KIND: reconcile_finetunejob,
    modeldeployment.KIND: reconcile_modeldeployment,
}
"""One reconciler per kind; the queue routes each key to its kind's."""


def bind(runtime: Runtime, reconcilers: dict[str, ReconcilerOf]) -> dict[str, Reconcile[ObjectKey]]:
    return {kind: functools.partial(reconcile, runtime) for kind, reconcile in reconcilers.items()}


def in_cluster_server(environ: Mapping[str, str]) -> str | None:
    """The API server's address in a pod, as client-go's InClusterConfig finds it: the `kubernetes`
    Service's `KUBERNETES_SERVICE_HOST`/`_PORT`, which the kubelet sets in every pod. kopf's own
    service-account login dials `kubernetes.default.svc`, which needs cluster DNS; a cluster without it
    (the dev cluster's local node) still has these variables. None outside a pod."""
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        return None
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def _login(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo | None:
    info = kopf.login_with_service_account(settings=settings)
    if info is not None:
        server = in_cluster_server(os.environ)
        return dataclasses.replace(info, server=server) if server else info
    kubeconfig: kopf.ConnectionInfo | None = kopf.login_with_kubeconfig(settings=settings)
    return kubeconfig


@kopf.on.login()
def login(*, settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo | None:
    """In a pod: the ServiceAccount; elsewhere: $KUBECONFIG. No `kubernetes` client is imported (memory)."""
    return _login(settings)


def configure(settings: kopf.OperatorSettings, config: OperatorConfig) -> None:
    settings.persistence.finalizer = KOPF_FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=STORAGE_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=STORAGE_PREFIX, key="last-handled-configuration"
    )
    settings.peering.standalone = True
    settings.posting.level = logging.WARNING  # our Events are posted by the controller, one per transition
    settings.networking.request_timeout = config.request_timeout_seconds
    settings.networking.connect_timeout = 10
    settings.watching.connect_timeout = 10
    settings.watching.server_timeout = 600  # streams end cleanly every 10 min and resume
    settings.execution.default_backoff = 5
    # Only our own children stream in (server-side), not every Job and Pod of the namespace.
    settings.watching.label_selectors["batch/v1", "jobs"] = JOB_LABEL
    settings.watching.label_selectors["v1", "pods"] = JOB_LABEL
    settings.watching.label_selectors["apps/v1", "deployments"] = DEPLOYMENT_LABEL


@kopf.on.startup()
async def startup(*, settings: kopf.OperatorSettings, memo: Any, logger: kopf.Logger, **_: Any) -> None:
    config = OperatorConfig.from_env()
    configure(settings, config)
    info = _login(settings)
    if info is None:
        raise kopf.PermanentError("no credentials: neither a ServiceAccount token nor $KUBECONFIG")
    # Each worker writes a job's children in parallel (six at once): enough connections for all of them.
    client = KubeClient.from_connection_info(
        info, timeout_seconds=config.request_timeout_seconds, pool=max(64, config.workers * 8)
    )
    metrics = OperatorMetrics()
    if config.metrics_port:
        metrics.serve(config.metrics_port)
    runtime = Runtime(client, config, metrics)
    runtime.start(bind(runtime, RECONCILERS))

    async def resync_forever() -> None:
        while True:
            await asyncio.sleep(config.drift_check_seconds)
            runtime.resync()

    runtime.spawn(resync_forever())
    memo.runtime = runtime
    memo.audit = runtime.audit = start_audit(config, metrics.registry, client, runtime.spawn)
    if config.webhook_port:
        await start_webhooks(settings, config, client, memo.audit, memo, runtime.spawn)
    logger.info("finetune-operator started: %d workers, metrics on :%s", config.workers, config.metrics_port)


@kopf.on.cleanup()
async def cleanup(*, memo: Any, **_: Any) -> None:
    audit: AuditLog | None = getattr(memo, "audit", None)
    if audit is not None:
        audit.close()
    runtime: Runtime | None = getattr(memo, "runtime", None)
    if runtime is None:
        return
    await runtime.stop()
    await runtime.client.close()


@kopf.on.probe(id="queue")
async def queue_probe(*, memo: Any, **_: Any) -> dict[str, int]:
    runtime: Runtime | None = getattr(memo, "runtime", None)
    depth = runtime.queue.depth if runtime is not None and runtime.queue is not None else 0
    return {"depth": depth}
