"""GPU gang admission across all FineTuneJobs this operator serves: one plan at a time, under one lock.

`GangAdmission` is the whole of its state (the plan, decisions the index doesn't show yet, planned
placements, the parsed spec demand per job) with its own `forget`; it reads the cluster through the client
and the `Observed` indexes it is given, and wakes jobs through the callbacks it is given. The decisions
themselves are pure (`scheduling/`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from finetune_operator.api.common import InvalidResourceError
from finetune_operator.api.finetunejob import parse_finetunejob
from finetune_operator.builders.trainer_job import node_selector, pod_tolerations
from finetune_operator.config import OperatorConfig
from finetune_operator.controllers.observed import Observed
from finetune_operator.controllers.summaries import SpecDemand
from finetune_operator.k8s import KubeClient
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.scheduling import (
    AdmissionPlan,
    GangDemand,
    Waiting,
    free_gpus_by_node,
    plan_admission,
)
from finetune_operator.scheduling.capacity import GPU_RESOURCE

logger = logging.getLogger(__name__)
PLAN_MAX_AGE_SECONDS = 5.0
_NON_TERMINATED = "status.phase!=Succeeded,status.phase!=Failed"


@dataclass(frozen=True)
class Decision:
    admitted: bool
    placement: list[str]
    waiting: Waiting | None = None
    queue_position: int | None = None


def spec_demand(body: Mapping[str, Any]) -> SpecDemand | None:
    """What admission needs from a FineTuneJob's spec; None if the spec is invalid (it never asks)."""
    try:
        job = parse_finetunejob(body)
    except InvalidResourceError:
        return None
    return SpecDemand(
        priority=job.spec.scheduling.priority,
        nodes=job.spec.distributed.nodes,
        gpus_per_node=job.spec.distributed.gpus_per_node,
        node_selector=tuple(sorted(node_selector(job).items())),
        tolerations=tuple(pod_tolerations(job)),
        queue_name=job.spec.scheduling.queue_name,
        suspend=job.spec.scheduling.suspend,
        gpu_resource=job.spec.resources.gpu_resource_name,
    )


class GangAdmission:
    """Admission state and decisions; jobs are named by `namespace/name`."""

    def __init__(
        self,
        client: KubeClient,
        config: OperatorConfig,
        metrics: OperatorMetrics,
        *,
        observed: Callable[[], Observed],
        wake: Callable[[str], None],
        waiting: Callable[[], list[str]],
    ) -> None:
        self._client = client
        self._config = config
        self._metrics = metrics
        self._observed = observed
        self._wake = wake
        """Enqueue one job."""
        self._waiting = waiting
        """Jobs that may be waiting for capacity (phase Queued or Pending)."""
        self._lock = asyncio.Lock()
        self._overrides: dict[str, bool] = {}
        """Admission decisions made here that the FineTuneJob index may not show yet (it lags the patch)."""
        self._placements: dict[str, list[str]] = {}
        self._demands: dict[str, tuple[str, int, SpecDemand | None]] = {}
        """(uid, generation, demand) per job: the spec is parsed once per generation, not on every status
        write (the trainer's progress reports are most of a running job's events); None if invalid."""
        self._capacity_generation = 0
        """Bumped whenever capacity or demand may have changed; a plan older than this is recomputed."""
        self._plan: AdmissionPlan | None = None
        self._plan_generation = -1
        self._plan_time = 0.0

    # --- what the reconciler asks -----------------------------------------------------------------------

    def admitted(self, job: str, default: bool = False) -> bool:
        """Whether `job` was admitted here, or `default` (its Admitted condition) if nothing was decided."""
        return self._overrides.get(job, default)

    def placement(self, job: str) -> list[str]:
        return list(self._placements.get(job, []))

    async def decide(self, job: str) -> Decision:
        """Admit `job` now, or say why it waits. Recomputes the shared plan when capacity or demand
        changed."""
        async with self._lock:
            plan = self._plan
            known = plan is not None and (job in plan.waiting or job in plan.admit)
            # Pods outside our watch (other workloads) also free and take GPUs: plans also expire.
            stale = time.monotonic() - self._plan_time > PLAN_MAX_AGE_SECONDS
            if plan is None or self._plan_generation != self._capacity_generation or not known or stale:
                plan = await self._recompute()
            if self._overrides.get(job):
                return Decision(True, self.placement(job))
            waiting = plan.waiting.get(job)
            if waiting is None:
                # Not in the index yet (it lags the API by a moment): decide on the next pass.
                self._capacity_generation += 1
                return Decision(False, [], Waiting("Pending", "waiting for the admission pass"), None)
            return Decision(False, [], waiting, plan.queue_position.get(job))

    def set_not_admitted(self, job: str) -> None:
        """`job` holds no GPUs (it is finished and its GPUs were released already): nobody to wake."""
        self._overrides[job] = False

    def release(self, job: str) -> None:
        """`job` no longer holds (or waits for) GPUs: free its reservation and wake waiting jobs."""
        was_admitted = self._overrides.get(job, True)
        self._overrides[job] = False
        self._placements.pop(job, None)
        if was_admitted:
            self.capacity_changed()

    def capacity_changed(self) -> None:
        """Demand or free GPUs changed: recompute the plan and wake every job still waiting."""
        self._capacity_generation += 1
        for job in self._waiting():
            self._wake(job)

    # --- what the handlers feed in ---------------------------------------------------------------------

    def demand_of(self, job: str, body: Mapping[str, Any]) -> SpecDemand | None:
        """`spec_demand(body)`, parsed again only when the object or its generation changed."""
        meta = body["metadata"]
        uid, generation = str(meta.get("uid")), int(meta.get("generation") or 0)
        known = self._demands.get(job)
        if known is not None and known[:2] == (uid, generation):
            return known[2]
        demand = spec_demand(body)
        self._demands[job] = (uid, generation, demand)
        return demand

    def forget(self, job: str) -> None:
        self._overrides.pop(job, None)
        self._placements.pop(job, None)
        self._demands.pop(job, None)

    # --- the plan ----------------------------------------------------------------------------------------

    def _gang_demands(self) -> list[GangDemand]:
        observed = self._observed()
        demands = []
        for summary in observed.finetunejobs():
            if summary.terminal or summary.spec.suspend or summary.spec.queue_name:
                continue
            admitted = self._overrides.get(summary.key, summary.admitted)
            bound: tuple[str, ...] = ()
            if admitted:
                pods = observed.trainer_pods(summary.key)
                bound = tuple(
                    sorted({p.node for p in pods if p.node and not p.terminated and not p.deleting})
                )
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
                    gpu_resource=summary.spec.gpu_resource,
                )
            )
        return demands

    async def _recompute(self) -> AdmissionPlan:
        generation = self._capacity_generation
        demands = self._gang_demands()
        nodes = await self._client.list("v1", "Node")
        pods = await self._client.list("v1", "Pod", field_selector=_NON_TERMINATED)
        # Capacity of every resource some job asks for, each counted on its own (pods request one each).
        resources = sorted({GPU_RESOURCE, *(d.gpu_resource for d in demands)})
        capacity = [node for r in resources for node in free_gpus_by_node(nodes, pods, r)]
        plan = plan_admission(capacity, demands, self._config.gpu_quota_per_namespace)
        for job in plan.admit:
            self._overrides[job] = True
            self._placements[job] = plan.placements.get(job, [])
            self._wake(job)
        self._plan = plan
        self._plan_generation = generation
        self._plan_time = time.monotonic()
        self._metrics.queue_length.set(len(plan.waiting))
        if plan.admit:
            logger.info("admitted %s; %d waiting", ", ".join(plan.admit), len(plan.waiting))
        return plan
