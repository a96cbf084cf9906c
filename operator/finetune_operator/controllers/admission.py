"""Gang admission across all FineTuneJobs this operator serves: one plan at a time, under one lock."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from finetune_operator.controllers.runtime import FtjSummary, Runtime
from finetune_operator.scheduling import (
    GangDemand,
    Preemption,
    Waiting,
    free_gpus_by_node,
    plan_admission,
)

logger = logging.getLogger(__name__)
PLAN_MAX_AGE_SECONDS = 5.0
_NON_TERMINATED = "status.phase!=Succeeded,status.phase!=Failed"


@dataclass(frozen=True)
class Decision:
    admitted: bool
    placement: list[str]
    waiting: Waiting | None = None
    queue_position: int | None = None


def _summaries(runtime: Runtime) -> list[FtjSummary]:
    index = runtime.indexes.get("finetunejobs")
    if index is None:
        return []
    return list(index.get("all", []))


def _demands(runtime: Runtime) -> list[GangDemand]:
    pods_index = runtime.indexes.get("trainer_pods")
    demands = []
    for summary in _summaries(runtime):
        if summary.terminal or summary.spec.suspend or summary.spec.queue_name:
            continue
        admitted = runtime.admitted_override.get(summary.key, summary.admitted)
        pods = [
            p for p in (pods_index.get(summary.key, []) if pods_index is not None else []) if not p.terminated
        ]
        bound = tuple(sorted({p.node for p in pods if p.node and not p.deleting}))
        demands.append(
            GangDemand(
                key=summary.key,
                namespace=summary.namespace,
                nodes=summary.spec.nodes,
                gpus_per_node=summary.spec.gpus_per_node,
                priority=summary.spec.priority,
                created=summary.created,
                node_selector=dict(summary.spec.node_selector),
                tolerations=summary.spec.tolerations,
                admitted=admitted,
                bound_nodes=bound,
                may_preempt=summary.spec.may_preempt,
                admitted_at=summary.admitted_at,
                # Not admitted while pods of an earlier attempt live (a preempted gang saving its
                # checkpoint): never two gangs of one job at once.
                draining=not admitted and bool(pods),
            )
        )
    return demands


async def _recompute(runtime: Runtime) -> None:
    generation = runtime.capacity_generation
    demands = _demands(runtime)
    nodes = await runtime.client.list("v1", "Node")
    pods = await runtime.client.list("v1", "Pod", field_selector=_NON_TERMINATED)
    config = runtime.config
    plan = plan_admission(
        free_gpus_by_node(nodes, pods),
        demands,
        config.gpu_quota_per_namespace,
        policy=config.admission_policy,
        now=datetime.now(UTC),
        min_run_seconds=config.preemption_min_run_seconds,
    )
    for key, preemption in plan.preempt.items():
        # Its reconcile stops the gang (graceful pod deletion: the trainer checkpoints on SIGTERM).
        runtime.admitted_override[key] = False
        runtime.placements.pop(key, None)
        runtime.preemptions[key] = preemption
        runtime.enqueue(key)
    if plan.preempt:
        logger.info("preempting %s", ", ".join(f"{k} for {p.preemptor}" for k, p in plan.preempt.items()))
    for key in plan.admit:
        runtime.admitted_override[key] = True
        runtime.placements[key] = plan.placements.get(key, [])
        runtime.enqueue(key)
    runtime.plan = plan
    runtime.plan_generation = generation
    runtime.plan_time = time.monotonic()
    runtime.metrics.queue_length.set(len(plan.waiting))
    if plan.admit:
        logger.info("admitted %s; %d waiting", ", ".join(plan.admit), len(plan.waiting))


async def admission_decision(runtime: Runtime, key: str) -> Decision:
    """Admit `key` now, or say why it waits. Recomputes the shared plan when capacity or demand changed."""
    async with runtime.admission_lock:
        plan = runtime.plan
        known = plan is not None and (key in plan.waiting or key in plan.admit)
        # Pods outside our watch (other workloads) also free and take GPUs: plans also expire.
        stale = time.monotonic() - runtime.plan_time > PLAN_MAX_AGE_SECONDS
        if plan is None or runtime.plan_generation != runtime.capacity_generation or not known or stale:
            await _recompute(runtime)
            plan = runtime.plan
        assert plan is not None
        if runtime.admitted_override.get(key):
            return Decision(True, runtime.placements.get(key, []))
        waiting = plan.waiting.get(key)
        if waiting is None:
            # Not in the index yet (it lags the API by a moment): decide on the next pass.
            runtime.capacity_generation += 1
            return Decision(False, [], Waiting("Pending", "waiting for the admission pass"), None)
        return Decision(False, [], waiting, plan.queue_position.get(key))


def preemption_of(runtime: Runtime, key: str) -> Preemption | None:
    """The preemption the plan decided for `key` and its reconcile has not carried out yet."""
    return runtime.preemptions.get(key)


def preempted(runtime: Runtime, key: str) -> None:
    """The reconcile of `key` has stopped its gang and recorded the preemption."""
    runtime.preemptions.pop(key, None)


def release(runtime: Runtime, key: str) -> None:
    """The job no longer holds (or waits for) GPUs: free its reservation and wake waiting jobs."""
    was_admitted = runtime.admitted_override.get(key, True)
    runtime.admitted_override[key] = False
    runtime.placements.pop(key, None)
    if was_admitted:
        runtime.capacity_changed()
