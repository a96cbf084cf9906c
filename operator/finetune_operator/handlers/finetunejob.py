"""Thin kopf handlers for FineTuneJobs: every trigger enqueues the job's key; the controller does the rest."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import kopf

from finetune_operator.api.common import GROUP, VERSION, InvalidResourceError
from finetune_operator.api.finetunejob import PLURAL, parse_finetunejob
from finetune_operator.builders.trainer_job import node_selector, pod_tolerations
from finetune_operator.controllers.admission import release
from finetune_operator.controllers.conditions import derive_phase, is_terminal, is_true
from finetune_operator.controllers.runtime import FtjSummary, Runtime, SpecDemand

INDEX_NAMES = ("finetunejobs", "trainer_jobs", "trainer_pods")


def runtime_of(memo: Any, kwargs: dict[str, Any]) -> Runtime:
    """The shared runtime, with the kopf indexes from this call's kwargs attached (they are live views)."""
    runtime: Runtime = memo.runtime
    if len(runtime.indexes) < len(INDEX_NAMES):
        runtime.indexes.update({name: kwargs[name] for name in INDEX_NAMES if name in kwargs})
    return runtime


def _demand(runtime: Runtime, key: str, body: kopf.Body) -> SpecDemand | None:
    """What admission needs from the spec, parsed again only when the object or its generation changed."""
    uid, generation = str(body.metadata.uid), int(body.metadata.get("generation") or 0)
    known = runtime.demands.get(key)
    if known is not None and known[:2] == (uid, generation):
        return known[2]
    try:
        job = parse_finetunejob(body)
    except InvalidResourceError:
        demand = None
    else:
        demand = SpecDemand(
            priority=job.spec.scheduling.priority,
            nodes=job.spec.distributed.nodes,
            gpus_per_node=job.spec.distributed.gpus_per_node,
            node_selector=tuple(sorted(node_selector(job).items())),
            tolerations=tuple(pod_tolerations(job)),
            queue_name=job.spec.scheduling.queue_name,
            suspend=job.spec.scheduling.suspend,
            may_preempt=job.spec.scheduling.preemption_policy == "PreemptLowerPriority",
        )
    runtime.demands[key] = (uid, generation, demand)
    return demand


@kopf.index(GROUP, VERSION, PLURAL)
async def finetunejobs(
    *, body: kopf.Body, namespace: str | None, name: str, memo: Any, **kwargs: Any
) -> dict[str, FtjSummary] | None:
    """All FineTuneJobs under one key, as the small facts that GPU admission needs."""
    demand = _demand(runtime_of(memo, kwargs), f"{namespace}/{name}", body)
    if demand is None:
        return None
    status = body.get("status") or {}
    conditions = list(status.get("conditions") or [])
    created = datetime.fromisoformat(str(body.metadata["creationTimestamp"]).replace("Z", "+00:00"))
    admitted_at = (status.get("admission") or {}).get("admittedAt")
    summary = FtjSummary(
        key=f"{namespace}/{name}",
        namespace=str(namespace),
        created=created,
        spec=demand,
        terminal=is_terminal(conditions),
        admitted=is_true(conditions, "Admitted"),
        phase=derive_phase(conditions),
        admitted_at=datetime.fromisoformat(str(admitted_at).replace("Z", "+00:00")) if admitted_at else None,
    )
    return {"all": summary}


def _needs_reconcile(previous: Mapping[str, Any] | None, body: Mapping[str, Any]) -> bool:
    """New to us (created, or listed at start-up), its spec changed, or its deletion began.

    Status writes (ours, or the trainer's progress every few seconds) are not a reason: the reconciler
    reads them when something else wakes it."""
    if previous is None:
        return True
    old, new = previous["metadata"], body["metadata"]
    return (
        old.get("uid") != new.get("uid")
        or old.get("generation") != new.get("generation")
        or bool(new.get("deletionTimestamp")) != bool(old.get("deletionTimestamp"))
    )


@kopf.on.event(GROUP, VERSION, PLURAL)
async def finetunejob_seen(*, event: kopf.RawEvent, body: kopf.Body, memo: Any, **kwargs: Any) -> None:
    """The one trigger for FineTuneJobs: keep the latest body for the reconciler (no GET per reconcile)
    and enqueue when it matters. No kopf change handlers or timers on this kind, so kopf writes nothing
    to the object: no diff-base annotation, no kopf finalizer (ours is managed by the reconciler)."""
    runtime = runtime_of(memo, kwargs)
    key = f"{body.metadata.namespace}/{body.metadata.name}"
    if event["type"] == "DELETED":
        release(runtime, key)
        runtime.forget(key)
        return
    previous = runtime.bodies.get(key)
    runtime.remember(dict(body))
    if _needs_reconcile(previous, body):
        runtime.capacity_changed()  # new or changed demand (size, priority, suspend)
        runtime.enqueue(key)
