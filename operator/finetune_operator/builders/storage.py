"""The checkpoint and output volume."""

from __future__ import annotations

from typing import Any

from finetune_operator.api.common import VolumeClaim
from finetune_operator.api.finetunejob import FineTuneJob
from finetune_operator.builders.common import checkpoint_claim_name, child_metadata
from finetune_operator.config import OperatorConfig


def claim_spec(
    storage: VolumeClaim, *, access: str, default_size: str, config: OperatorConfig
) -> dict[str, Any]:
    """The spec of a claim the operator creates for `storage` (its size and class, or the defaults)."""
    spec: dict[str, Any] = {
        "accessModes": [access],
        "resources": {"requests": {"storage": str(storage.size or default_size)}},
    }
    storage_class = storage.storage_class_name or config.storage_class
    if storage_class:
        spec["storageClassName"] = storage_class
    return spec


def build_checkpoint_pvc(job: FineTuneJob, config: OperatorConfig) -> dict[str, Any] | None:
    """The claim restarts resume from; None when the job uses its own `existingClaim`.

    A multi-node gang shares it, so it is ReadWriteMany there (the StorageClass must support it);
    a single pod gets ReadWriteOnce.
    """
    storage = job.spec.checkpointing.storage
    if storage.existing_claim:
        return None
    access = "ReadWriteMany" if job.spec.distributed.nodes > 1 else "ReadWriteOnce"
    spec = claim_spec(storage, access=access, default_size=config.default_pvc_size, config=config)
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": child_metadata(job, checkpoint_claim_name(job), "checkpoints"),
        "spec": spec,
    }
