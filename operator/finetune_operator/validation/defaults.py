"""Defaults that depend on the cluster's state, filled by the mutating webhook at CREATE. Pure.

Only fields the request left unset are filled, so nothing the user wrote is replaced; each filled field is
listed in the annotation `finetune.dev/defaulted` (field=value, comma-separated), and the audit record of
the request (written by the validating webhook, which sees the mutated object) digests the filled spec.

- FineTuneJob `spec.checkpointing.storage.storageClassName` (no `existingClaim`) and ModelDeployment
  `spec.feedback.storage.storageClassName` (feedback on, no `existingClaim`): the cluster's default
  StorageClass;
- FineTuneJob `spec.scheduling.queueName`: `default`, when the namespace has a Kueue LocalQueue named
  `default` (Kueue's own defaulting convention).

Why: a claim without a class takes whatever class is the default *when the claim is made* (the checkpoint
claim is made at admission, a restart may come after an administrator changed the default); writing the
class down at CREATE makes the job's storage what it was admitted with, and visible in `kubectl get -o yaml`.
The queue: a namespace whose GPUs are managed by Kueue should not have a job slip past its quota because the
user forgot `queueName`.

Filled fields behave like written ones afterwards: `spec.checkpointing` is frozen while the job runs, so a
server-side apply that drops the filled class while the job runs is refused (naming the field) rather than
silently applied.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from finetune_operator.api.finetunejob import KIND as FINETUNEJOB
from finetune_operator.api.modeldeployment import KIND as MODELDEPLOYMENT

DEFAULTED = "finetune.dev/defaulted"
DEFAULT_CLASS_ANNOTATION = "storageclass.kubernetes.io/is-default-class"
DEFAULT_LOCAL_QUEUE = "default"
"""Kueue's convention (feature LocalQueueDefaulting): a LocalQueue named `default` takes unlabelled jobs."""


@dataclass(frozen=True)
class ClusterDefaults:
    """What the cluster offers as defaults, as the mutating webhook found it."""

    storage_class: str | None = None
    """The default StorageClass (the newest one, when several are marked, as Kubernetes picks it)."""
    local_queue: str | None = None
    """A LocalQueue named `default` in the request's namespace."""


def default_storage_class(classes: Sequence[Mapping[str, Any]]) -> str | None:
    """The StorageClass Kubernetes gives a claim without a class: of those marked default, the newest."""
    marked = [
        sc
        for sc in classes
        if ((sc.get("metadata") or {}).get("annotations") or {}).get(DEFAULT_CLASS_ANNOTATION) == "true"
    ]
    if not marked:
        return None
    newest = max(
        marked, key=lambda sc: (str(sc["metadata"].get("creationTimestamp", "")), str(sc["metadata"]["name"]))
    )
    return str(newest["metadata"]["name"])


def _section(spec: Mapping[str, Any], *path: str) -> Mapping[str, Any]:
    node: Any = spec
    for key in path:
        node = node.get(key) if isinstance(node, Mapping) else None
    return node if isinstance(node, Mapping) else {}


def needs_cluster_defaults(kind: str, body: Mapping[str, Any]) -> tuple[bool, bool]:
    """(needs the default StorageClass, needs the LocalQueue lookup) for `body`, so nothing else is read."""
    spec = body.get("spec") or {}
    if kind == FINETUNEJOB:
        storage = _section(spec, "checkpointing", "storage")
        unset_class = "existingClaim" not in storage and "storageClassName" not in storage
        return unset_class, "queueName" not in _section(spec, "scheduling")
    if kind == MODELDEPLOYMENT:
        feedback = _section(spec, "feedback")
        storage = _section(feedback, "storage")
        unset_class = (
            feedback.get("enabled") is True
            and "existingClaim" not in storage
            and "storageClassName" not in storage
        )
        return unset_class, False
    return False, False


def defaults_patch(kind: str, body: Mapping[str, Any], found: ClusterDefaults) -> dict[str, Any]:
    """A merge patch (`spec` and the `finetune.dev/defaulted` annotation) filling what `body` left unset;
    empty when nothing is filled."""
    wants_class, wants_queue = needs_cluster_defaults(kind, body)
    spec: dict[str, Any] = {}
    filled: list[str] = []
    if wants_class and found.storage_class:
        section = "checkpointing" if kind == FINETUNEJOB else "feedback"
        spec[section] = {"storage": {"storageClassName": found.storage_class}}
        filled.append(f"spec.{section}.storage.storageClassName={found.storage_class}")
    if wants_queue and found.local_queue:
        spec["scheduling"] = {"queueName": found.local_queue}
        filled.append(f"spec.scheduling.queueName={found.local_queue}")
    if not filled:
        return {}
    return {"spec": spec, "metadata": {"annotations": {DEFAULTED: ",".join(filled)}}}
