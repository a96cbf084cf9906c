"""Thin kopf handlers for FineTuneJobs: every trigger enqueues the job's key; the controller does the rest."""

from __future__ import annotations

import random
from datetime import datetime
from typing import Any

import kopf

from finetune_operator.api.common import GROUP, VERSION, InvalidResourceError
from finetune_operator.api.finetunejob import PLURAL, parse_finetunejob
from finetune_operator.builders.trainer_job import node_selector, pod_tolerations
from finetune_operator.config import OperatorConfig
from finetune_operator.controllers.admission import release
from finetune_operator.controllers.conditions import derive_phase, is_terminal, is_true
from finetune_operator.controllers.runtime import FtjSummary, Runtime

_SETTINGS = OperatorConfig.from_env()
INDEX_NAMES = ("finetunejobs", "trainer_jobs", "trainer_pods")


def runtime_of(memo: Any, kwargs: dict[str, Any]) -> Runtime:
    """The shared runtime, with the kopf indexes from this call's kwargs attached (they are live views)."""
    runtime: Runtime = memo.runtime
    if len(runtime.indexes) < len(INDEX_NAMES):
        runtime.indexes.update({name: kwargs[name] for name in INDEX_NAMES if name in kwargs})
    return runtime


@kopf.index(GROUP, VERSION, PLURAL)
async def finetunejobs(
    *, body: kopf.Body, namespace: str | None, name: str, **_: Any
) -> dict[str, FtjSummary] | None:
    """All FineTuneJobs under one key, as the small facts that GPU admission needs."""
    try:
        job = parse_finetunejob(body)
    except InvalidResourceError:
        return None
    conditions = list((body.get("status") or {}).get("conditions") or [])
    created = datetime.fromisoformat(str(body.metadata["creationTimestamp"]).replace("Z", "+00:00"))
    summary = FtjSummary(
        key=f"{namespace}/{name}",
        namespace=str(namespace),
        created=created,
        priority=job.spec.scheduling.priority,
        nodes=job.spec.distributed.nodes,
        gpus_per_node=job.spec.distributed.gpus_per_node,
        node_selector=tuple(sorted(node_selector(job).items())),
        tolerations=tuple(pod_tolerations(job)),
        queue_name=job.spec.scheduling.queue_name,
        suspend=job.spec.scheduling.suspend,
        terminal=is_terminal(conditions),
        admitted=is_true(conditions, "Admitted"),
        phase=derive_phase(conditions),
    )
    return {"all": summary}


@kopf.on.event(GROUP, VERSION, PLURAL)
async def finetunejob_seen(*, event: kopf.RawEvent, body: kopf.Body, memo: Any, **kwargs: Any) -> None:
    """Keep the latest body for the reconciler (no GET per reconcile); forget it once deleted."""
    runtime = runtime_of(memo, kwargs)
    key = f"{body.metadata.namespace}/{body.metadata.name}"
    if event["type"] == "DELETED":
        runtime.bodies.pop(key, None)
        return
    runtime.remember(dict(body))
    if event["type"] == "ADDED":
        # Start at once; kopf's create handler (after it has added the finalizer) enqueues it again,
        # which the queue coalesces or turns into a cheap no-op reconcile.
        runtime.capacity_changed()
        runtime.enqueue(key)


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def finetunejob_changed(*, namespace: str | None, name: str, memo: Any, **kwargs: Any) -> None:
    runtime = runtime_of(memo, kwargs)
    runtime.capacity_changed()  # new or changed demand (size, priority, suspend)
    runtime.enqueue(f"{namespace}/{name}")


@kopf.on.resume(GROUP, VERSION, PLURAL)
async def finetunejob_resumed(*, namespace: str | None, name: str, memo: Any, **kwargs: Any) -> None:
    runtime_of(memo, kwargs).enqueue(f"{namespace}/{name}")


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def finetunejob_deleted(*, namespace: str | None, name: str, memo: Any, **kwargs: Any) -> None:
    """Children go with the owner (ownerReferences + garbage collection); free its GPUs for others."""
    runtime = runtime_of(memo, kwargs)
    key = f"{namespace}/{name}"
    release(runtime, key)
    runtime.forget(key)


@kopf.timer(
    GROUP,
    VERSION,
    PLURAL,
    interval=_SETTINGS.drift_check_seconds,
    idle=60,
    initial_delay=lambda **_: random.uniform(0, _SETTINGS.drift_check_seconds),
)
async def finetunejob_drift_check(*, namespace: str | None, name: str, memo: Any, **kwargs: Any) -> None:
    """Re-apply children and re-read state now and then, in case something changed them behind our back."""
    runtime = runtime_of(memo, kwargs)
    key = f"{namespace}/{name}"
    runtime.applied_generation.pop(key, None)
    runtime.enqueue(key)
