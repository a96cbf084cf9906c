"""Events on the server Deployments, turned into wake-ups of their ModelDeployment's reconcile.

A Deployment's status moves as its pods become ready (or fail), so one watch on Deployments covers the
rollout; the reconciler reads the pods themselves only when it needs them (metrics, readiness answers).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from finetune_operator.api.modeldeployment import KIND
from finetune_operator.builders.serving_common import DEPLOYMENT_LABEL
from finetune_operator.controllers.work_queue import ObjectKey
from finetune_operator.handlers.indexes import runtime_of


@kopf.on.event("apps/v1", "deployments", labels={DEPLOYMENT_LABEL: kopf.PRESENT})
async def server_deployment_event(
    *, event: kopf.RawEvent, namespace: str | None, labels: Mapping[str, str], memo: Any, **kwargs: Any
) -> None:
    if event["type"] is None or namespace is None:
        return  # initial listing: the owners are reconciled once anyway when they are listed
    runtime_of(memo, kwargs).enqueue(ObjectKey(KIND, namespace, labels[DEPLOYMENT_LABEL]))
