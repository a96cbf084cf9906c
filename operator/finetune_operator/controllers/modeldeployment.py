"""reconcile_modeldeployment: for now only acknowledges the spec (observedGeneration + `Progressing=True`,
reason `Accepted`), on the shared work queue and through the kind-generic status writer."""

from __future__ import annotations

from datetime import UTC, datetime

from finetune_operator.api.modeldeployment import CONDITION_PROGRESSING, CONDITION_TYPES, KIND
from finetune_operator.controllers.runtime import Runtime
from finetune_operator.controllers.status import StatusRules, StatusWriter
from finetune_operator.controllers.work_queue import ObjectKey

STATUS_RULES = StatusRules(owned_fields=("observedGeneration", "conditions"), condition_order=CONDITION_TYPES)


async def reconcile_modeldeployment(runtime: Runtime, key: ObjectKey) -> float | None:
    """Reconcile one ModelDeployment; returns seconds until it wants to run again, or None."""
    assert key.kind == KIND, key
    body = await runtime.current_body(key)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None  # children go with their owner (ownerReferences + garbage collection)
    writer = StatusWriter(runtime, body, datetime.now(UTC), STATUS_RULES)
    writer.set(
        CONDITION_PROGRESSING,
        True,
        "Accepted",
        "accepted; rollout is handled by the ModelDeployment controller",
    )
    await writer.commit()
    return None
