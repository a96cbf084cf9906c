"""ModelDeployment: for now only acknowledges the spec (observedGeneration + an Accepted condition)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from finetune_operator.controllers.conditions import set_condition
from finetune_operator.controllers.runtime import Runtime

API_VERSION = "finetune.dev/v1alpha1"
KIND = "ModelDeployment"


async def reconcile_modeldeployment(runtime: Runtime, body: dict[str, Any]) -> None:
    meta = body["metadata"]
    status = body.get("status") or {}
    generation = int(meta.get("generation") or 0)
    with runtime.metrics.time_reconcile(KIND):
        conditions = set_condition(
            status.get("conditions") or [],
            "Progressing",
            True,
            "Accepted",
            "accepted; rollout is handled by the ModelDeployment controller",
            generation=generation,
            now=datetime.now(UTC),
        )
        if status.get("observedGeneration") == generation and status.get("conditions") == conditions:
            return
        await runtime.client.patch_status(
            API_VERSION,
            KIND,
            meta["name"],
            meta["namespace"],
            {"observedGeneration": generation, "conditions": conditions},
        )
