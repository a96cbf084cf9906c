"""Admission order and the admission plan: who gets GPUs now, and why the others wait."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from finetune_operator.scheduling.capacity import GPU_RESOURCE, NodeGpus, node_fits
from finetune_operator.scheduling.placement import place_gang

INSUFFICIENT_GPUS = "InsufficientGPUs"
QUOTA_EXCEEDED = "GPUQuotaExceeded"
TIMES = "\N{MULTIPLICATION SIGN}"


@dataclass(frozen=True)
class GangDemand:
    """What one FineTuneJob asks of the cluster, and what it already holds."""

    key: str
    """`namespace/name`, unique."""
    namespace: str
    nodes: int
    gpus_per_node: int
    priority: int
    created: datetime
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    admitted: bool = False
    """Already admitted: its GPUs are reserved before anyone new is admitted."""
    bound_nodes: tuple[str, ...] = ()
    """Nodes where this job's live pods are bound; their GPUs are already in the nodes' free count."""
    gpu_resource: str = GPU_RESOURCE
    """The extended resource its pods request (`resources.gpuResourceName`): only that capacity counts."""

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Waiting:
    reason: str
    message: str


@dataclass
class AdmissionPlan:
    admit: list[str] = field(default_factory=list)
    """Keys of jobs to admit now, in admission order."""
    waiting: dict[str, Waiting] = field(default_factory=dict)
    """Jobs that stay queued, with the reason and message for their Admitted=False condition."""
    queue_position: dict[str, int] = field(default_factory=dict)
    """1-based position of each waiting job in the admission order."""
    placements: dict[str, list[str]] = field(default_factory=dict)
    """Planned node of each piece (rank order) of every job admitted now."""


def admission_order(demands: Sequence[GangDemand]) -> list[GangDemand]:
    """Higher priority first, then older first; the key breaks ties so the order is total."""
    return sorted(demands, key=lambda d: (-d.priority, d.created, d.key))


def _selector_text(selector: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(selector.items()))


def waiting_message(
    demand: GangDemand, free: Mapping[str, int], eligible: Sequence[str], *, offered: bool = True
) -> str:
    """E.g. `needs 2 nodes x 8 GPUs (nvidia.com/gpu.product=...); largest free: 8 on gpu-node-1, 4 on ...`
    (with a multiplication sign). A resource other than `nvidia.com/gpu` is named instead of "GPUs";
    `offered=False` says that no ready node has any of the resource at all."""
    unit = "node" if demand.nodes == 1 else "nodes"
    what = "GPUs" if demand.gpu_resource == GPU_RESOURCE else demand.gpu_resource
    head = f"needs {demand.nodes} {unit} {TIMES} {demand.gpus_per_node} {what}"
    if demand.node_selector:
        head += f" ({_selector_text(demand.node_selector)})"
    if not offered:
        return f"{head}; no ready node has {demand.gpu_resource} capacity"
    if not eligible:
        return f"{head}; no GPU node matches its node selector and tolerations"
    largest = sorted(((free[name], name) for name in eligible), key=lambda item: (-item[0], item[1]))
    shown = ", ".join(f"{count} on {name}" for count, name in largest[: max(demand.nodes, 2) + 1])
    message = f"{head}; largest free: {shown}"
    if len(eligible) < demand.nodes:
        nodes = "node exists" if len(eligible) == 1 else "nodes exist"
        message += f"; only {len(eligible)} matching {nodes}"
    return message


def plan_admission(
    nodes: Sequence[NodeGpus],
    demands: Sequence[GangDemand],
    quota_by_namespace: Mapping[str, int] | None = None,
) -> AdmissionPlan:
    """Reserve GPUs for admitted jobs, then admit waiting ones in order while their whole gang fits.

    A job that doesn't fit doesn't block smaller ones behind it (best-effort FIFO, as Kueue's
    BestEffortFIFO), but everyone ahead of it has already taken their GPUs, so priority always wins
    when capacity frees up. Admitted jobs whose pods are not bound yet keep their GPUs reserved, so
    two jobs are never admitted into the same free GPUs. `nodes` may hold entries for several GPU
    resources; a job is placed only on entries of the resource its pods request (`gpu_resource`). The
    namespace quota counts the GPUs of every resource together.
    """
    quota = dict(quota_by_namespace or {})
    free_by_resource: dict[str, dict[str, int]] = {}
    for node in nodes:
        free_by_resource.setdefault(node.resource, {})[node.name] = node.free
    used_by_namespace: dict[str, int] = {}
    plan = AdmissionPlan()

    def eligible(demand: GangDemand) -> list[str]:
        return [
            n.name
            for n in nodes
            if n.resource == demand.gpu_resource and node_fits(n, demand.node_selector, demand.tolerations)
        ]

    def free_of(demand: GangDemand) -> dict[str, int]:
        return free_by_resource.setdefault(demand.gpu_resource, {})

    def reserve(demand: GangDemand, names: Sequence[str]) -> None:
        free = free_of(demand)
        for name in names:
            free[name] -= demand.gpus_per_node

    ordered = admission_order(demands)
    for demand in ordered:
        if not demand.admitted:
            continue
        used_by_namespace[demand.namespace] = used_by_namespace.get(demand.namespace, 0) + demand.total_gpus
        missing = demand.nodes - len(set(demand.bound_nodes))
        if missing <= 0 or demand.gpus_per_node == 0:
            continue
        free = free_of(demand)
        pool = {name: free[name] for name in eligible(demand)}
        placed = place_gang(pool, missing, demand.gpus_per_node, exclude=demand.bound_nodes)
        if placed is None:
            # Already admitted and short of room (e.g. a node vanished): reserve what exists so
            # nobody new is admitted into it; the job's pods stay Pending until capacity returns.
            placed = [n for n, _ in sorted(pool.items(), key=lambda kv: -kv[1])][:missing]
            for name in placed:
                free[name] = max(0, free[name] - demand.gpus_per_node)
            continue
        reserve(demand, placed)

    position = 0
    for demand in ordered:
        if demand.admitted:
            continue
        position += 1
        limit = quota.get(demand.namespace)
        used = used_by_namespace.get(demand.namespace, 0)
        if limit is not None and used + demand.total_gpus > limit:
            plan.waiting[demand.key] = Waiting(
                QUOTA_EXCEEDED,
                f"needs {demand.total_gpus} GPUs; namespace {demand.namespace} uses {used} of its "
                f"quota of {limit}",
            )
            plan.queue_position[demand.key] = position
            continue
        names = eligible(demand)
        free = free_of(demand)
        chosen: list[str] | None = []
        if demand.gpus_per_node > 0:
            chosen = place_gang({n: free[n] for n in names}, demand.nodes, demand.gpus_per_node)
        if chosen is None:
            message = waiting_message(demand, free, names, offered=bool(free))
            plan.waiting[demand.key] = Waiting(INSUFFICIENT_GPUS, message)
            plan.queue_position[demand.key] = position
            continue
        reserve(demand, chosen)
        used_by_namespace[demand.namespace] = used + demand.total_gpus
        plan.admit.append(demand.key)
        plan.placements[demand.key] = chosen
    return plan
