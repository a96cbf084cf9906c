"""Admission order and the admission plan: who gets GPUs now, who is preempted, what is held for whom,
and why the others wait.

One pass over all gangs in admission order (priority, then age):

1. admitted gangs reserve their GPUs (also those whose pods are not bound yet);
2. each waiting gang is admitted if its whole gang fits now;
3. else, if it fits once the GPUs already being freed are free (pods being deleted, preempted gangs
   saving their checkpoints), it waits for them and they are **held** for it;
4. else, if it may preempt, the fewest and lowest lower-priority gangs whose removal lets it fit are
   preempted (scheduling/preemption.py) and their nodes are held for it;
5. else it waits; under the **strict** policy the nodes it will need are held for it, so nothing behind
   it can delay it (backfill only onto nodes it cannot use), under **best-effort** smaller gangs behind
   it may take them (today's behaviour, Kueue's BestEffortFIFO).

"Held" means: of the free GPUs of a held node, the holder's `gpusPerNode` are kept back; whatever is
free beyond that may still go to gangs behind it (they cannot delay the holder), and GPUs freed there
later go to the holder. A gang that can never fit (fewer matching nodes than it needs) holds nothing.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from finetune_operator.scheduling.capacity import GPU_RESOURCE, NodeGpus, node_fits
from finetune_operator.scheduling.placement import place_gang
from finetune_operator.scheduling.preemption import Candidate, select_victims

INSUFFICIENT_GPUS = "InsufficientGPUs"
QUOTA_EXCEEDED = "GPUQuotaExceeded"
PREEMPTING = "Preempting"
"""Admitted=False reason of a gang that is preempting lower-priority ones to fit."""
PREEMPTED = "Preempted"
"""Admitted=False reason of a gang that was preempted (and waits to resume from its checkpoint)."""
DRAINING = "PreviousPodsStopping"
"""Admitted=False reason of a gang whose earlier pods still hold GPUs (it never runs twice at once)."""
TIMES = "\N{MULTIPLICATION SIGN}"


class AdmissionPolicy(enum.StrEnum):
    """What a waiting gang that does not fit does to the gangs behind it (FTO_ADMISSION_POLICY)."""

    STRICT = "strict"
    """The nodes it needs are held for it: gangs behind it only go where they cannot delay it."""
    BEST_EFFORT = "best-effort"
    """Gangs behind it that fit are admitted, even onto nodes it needs (it may wait for ever)."""


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
    """Nodes where this job's live (not deleting) pods are bound; their GPUs are already in the nodes'
    free count."""
    may_preempt: bool = False
    """`scheduling.preemptionPolicy: PreemptLowerPriority`: it may preempt lower-priority gangs."""
    admitted_at: datetime | None = None
    """When its current admission began (the minimum run time counts from here); None if unknown."""
    draining: bool = False
    """Not admitted, but pods of an earlier attempt are still alive (a preempted gang saving its
    checkpoint): it is not admitted again until they are gone, and their GPUs are being freed."""
    gpu_resource: str = GPU_RESOURCE
    """The extended resource its pods request (`resources.gpuResourceName`): only that capacity counts."""

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Waiting:
    reason: str
    message: str


@dataclass(frozen=True)
class Preemption:
    """One preempted gang: who preempts it, and the message of its Preempted condition and Event."""

    preemptor: str
    preemptor_priority: int
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
    preempt: dict[str, Preemption] = field(default_factory=dict)
    """Admitted gangs to preempt now (stop gracefully, back to the queue), by key."""
    held: dict[str, list[str]] = field(default_factory=dict)
    """Nodes held for each waiting gang."""


def admission_order(demands: Sequence[GangDemand]) -> list[GangDemand]:
    """Higher priority first, then older first; the key breaks ties so the order is total."""
    return sorted(demands, key=lambda d: (-d.priority, d.created, d.key))


def _selector_text(selector: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(selector.items()))


def _gangs(count: int) -> str:
    return f"{count} {'node' if count == 1 else 'nodes'}"


def waiting_message(
    demand: GangDemand, free: Mapping[str, int], eligible: Sequence[str], *, offered: bool = True
) -> str:
    """E.g. `needs 2 nodes x 8 GPUs (nvidia.com/gpu.product=...); largest free: 8 on gpu-node-1, 4 on ...`
    (with a multiplication sign). A resource other than `nvidia.com/gpu` is named instead of "GPUs";
    `offered=False` says that no ready node has any of the resource at all."""
    what = "GPUs" if demand.gpu_resource == GPU_RESOURCE else demand.gpu_resource
    head = f"needs {_gangs(demand.nodes)} {TIMES} {demand.gpus_per_node} {what}"
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


def _seconds(value: float) -> str:
    return f"{max(0, round(value))} s"


@dataclass
class _Resource:
    """One GPU resource's capacity during a pass, by node name (a node may offer several resources)."""

    allocatable: dict[str, int] = field(default_factory=dict)
    free: dict[str, int] = field(default_factory=dict)
    """Free GPUs after reservations and admissions: what the messages show."""
    open: dict[str, int] = field(default_factory=dict)
    """`free` less what is held: what a gang may take now."""
    freeing: dict[str, int] = field(default_factory=dict)
    """GPUs that are being freed (pods being deleted, gangs preempted): free soon."""
    held_by: dict[str, GangDemand] = field(default_factory=dict)


class _Pass:
    """The state of one admission pass: free GPUs, GPUs being freed, holds, quota use."""

    def __init__(
        self,
        nodes: Sequence[NodeGpus],
        demands: Sequence[GangDemand],
        quota: Mapping[str, int],
        policy: AdmissionPolicy,
        now: datetime | None,
        min_run_seconds: float,
    ) -> None:
        self.nodes = nodes
        self.resources: dict[str, _Resource] = {}
        for node in nodes:
            capacity = self.resources.setdefault(node.resource, _Resource())
            capacity.allocatable[node.name] = node.allocatable
            capacity.free[node.name] = capacity.open[node.name] = node.free
            capacity.freeing[node.name] = node.terminating
        self.ordered = admission_order(demands)
        self.quota = quota
        self.policy = policy
        self.now = now
        self.min_run_seconds = min_run_seconds
        self.used_by_namespace: dict[str, int] = {}
        """GPUs of admitted gangs per namespace (what its quota counts)."""
        self.quota_held: dict[str, int] = {}
        """Quota per namespace held for waiting gangs ahead (see `hold_quota`)."""
        self.occupied: dict[str, tuple[str, ...]] = {}
        """Nodes of each admitted gang (bound or reserved): where its preemption frees GPUs."""
        self.plan = AdmissionPlan()

    def of(self, demand: GangDemand) -> _Resource:
        """The capacity of the resource `demand`'s pods request; empty if no node offers it."""
        return self.resources.setdefault(demand.gpu_resource, _Resource())

    def eligible(self, demand: GangDemand) -> list[str]:
        return [
            n.name
            for n in self.nodes
            if n.resource == demand.gpu_resource and node_fits(n, demand.node_selector, demand.tolerations)
        ]

    def take(self, demand: GangDemand, names: Sequence[str]) -> None:
        capacity = self.of(demand)
        for name in names:
            capacity.free[name] = max(0, capacity.free[name] - demand.gpus_per_node)
            capacity.open[name] = max(0, capacity.open[name] - demand.gpus_per_node)

    def hold(self, demand: GangDemand, names: Sequence[str]) -> None:
        capacity = self.of(demand)
        for name in names:
            capacity.held_by.setdefault(name, demand)
            capacity.open[name] = max(0, capacity.open[name] - demand.gpus_per_node)
        if names:
            self.plan.held[demand.key] = list(names)

    def held_for_another(self, name: str, demand: GangDemand) -> bool:
        holder = self.of(demand).held_by.get(name)
        return holder is not None and holder.key != demand.key

    def usable_later(self, demand: GangDemand, names: Sequence[str]) -> dict[str, int]:
        """What `demand` could have of `names` once what is being freed is free; GPUs freed on a node
        held for a gang ahead of it go to that gang."""
        capacity = self.of(demand)
        return {
            n: capacity.open[n] + (0 if self.held_for_another(n, demand) else capacity.freeing[n])
            for n in names
        }

    # --- 1. admitted gangs ------------------------------------------------------------------------
    def reserve_admitted(self) -> None:
        for demand in self.ordered:
            if not demand.admitted:
                freeing = self.of(demand).freeing
                if demand.draining:
                    for name in set(demand.bound_nodes) & set(freeing):
                        freeing[name] += demand.gpus_per_node
                continue
            ns = demand.namespace
            self.used_by_namespace[ns] = self.used_by_namespace.get(ns, 0) + demand.total_gpus
            bound = tuple(sorted(set(demand.bound_nodes)))
            missing = demand.nodes - len(bound)
            self.occupied[demand.key] = bound
            if missing <= 0 or demand.gpus_per_node == 0:
                continue
            pool = {name: self.of(demand).open[name] for name in self.eligible(demand)}
            placed = place_gang(pool, missing, demand.gpus_per_node, exclude=bound)
            if placed is None:
                # Already admitted and short of room (e.g. a node vanished): reserve what exists so
                # nobody new is admitted into it; the job's pods stay Pending until capacity returns.
                placed = [n for n, _ in sorted(pool.items(), key=lambda kv: -kv[1]) if n not in bound]
                placed = placed[:missing]
            self.take(demand, placed)
            self.occupied[demand.key] = bound + tuple(placed)

    # --- 2.-5. waiting gangs ----------------------------------------------------------------------
    def place_waiting(self) -> None:
        position = 0
        for demand in self.ordered:
            if demand.admitted or demand.key in self.plan.preempt:
                continue
            position += 1
            waiting = self.decide(demand)
            if waiting is None:
                continue
            self.plan.waiting[demand.key] = waiting
            self.plan.queue_position[demand.key] = position

    def decide(self, demand: GangDemand) -> Waiting | None:
        ns, total = demand.namespace, demand.total_gpus
        limit = self.quota.get(ns)
        used, held = self.used_by_namespace.get(ns, 0), self.quota_held.get(ns, 0)
        over_quota = limit is not None and used + held + total > limit
        names = self.eligible(demand)
        capacity = self.of(demand)
        if demand.draining:
            self.hold_quota(demand)
            return Waiting(
                DRAINING,
                "waiting for the pods of its previous attempt to save a checkpoint and stop (they hold "
                f"{demand.gpus_per_node} GPUs on each of {_gangs(demand.nodes)})",
            )
        if demand.gpus_per_node == 0 and not over_quota:
            self.admit(demand, [])
            return None
        if not over_quota:
            chosen = place_gang({n: capacity.open[n] for n in names}, demand.nodes, demand.gpus_per_node)
            if chosen is not None:
                self.admit(demand, chosen)
                return None
            later = place_gang(self.usable_later(demand, names), demand.nodes, demand.gpus_per_node)
            if later is not None:
                self.hold(demand, later)
                self.hold_quota(demand)
                return Waiting(
                    INSUFFICIENT_GPUS,
                    f"{self.message(demand, names)}; waiting for GPUs being freed (pods "
                    f"stopping) on {', '.join(later)}{self.held_note(demand)}",
                )
        preempting = self.preempt_for(demand, names, over_quota, limit, used + held)
        if preempting is not None:
            return preempting
        if over_quota:
            self.hold_quota(demand)
            held_text = f", and {held} are held for jobs ahead of it" if held else ""
            return Waiting(
                QUOTA_EXCEEDED,
                f"needs {total} GPUs; namespace {ns} uses {used} of its quota of {limit}{held_text}"
                f"{self.later_preemption_note(demand, names, over_quota, limit, used + held)}",
            )
        if self.policy is AdmissionPolicy.STRICT:
            self.hold(demand, self.nodes_to_hold(demand, names))
            self.hold_quota(demand)
        return Waiting(
            INSUFFICIENT_GPUS,
            f"{self.message(demand, names)}{self.blocked_note(demand, names)}"
            f"{self.held_note(demand)}"
            f"{self.later_preemption_note(demand, names, over_quota, limit, used + held)}",
        )

    def message(self, demand: GangDemand, names: Sequence[str]) -> str:
        capacity = self.of(demand)
        return waiting_message(demand, capacity.free, names, offered=bool(capacity.free))

    def admit(self, demand: GangDemand, chosen: list[str]) -> None:
        self.take(demand, chosen)
        ns = demand.namespace
        self.used_by_namespace[ns] = self.used_by_namespace.get(ns, 0) + demand.total_gpus
        self.plan.admit.append(demand.key)
        self.plan.placements[demand.key] = chosen

    def hold_quota(self, demand: GangDemand) -> None:
        """Under strict, a waiting gang's quota is held too: nobody behind it in its namespace takes it.
        A gang that holds GPUs (waiting for them to be freed, or preempting) always holds its quota."""
        if self.policy is AdmissionPolicy.STRICT or demand.key in self.plan.held:
            ns = demand.namespace
            self.quota_held[ns] = self.quota_held.get(ns, 0) + demand.total_gpus

    def nodes_to_hold(self, demand: GangDemand, names: Sequence[str]) -> list[str]:
        """The nodes it will most likely get first (most GPUs free or being freed), if it can ever fit."""
        capacity = self.of(demand)
        big_enough = [n for n in names if capacity.allocatable[n] >= demand.gpus_per_node]
        if len(big_enough) < demand.nodes:
            return []
        unheld = [n for n in big_enough if n not in capacity.held_by]
        unheld.sort(key=lambda n: (-(capacity.open[n] + capacity.freeing[n]), n))
        return unheld[: demand.nodes]

    def held_note(self, demand: GangDemand) -> str:
        held = self.plan.held.get(demand.key)
        if not held:
            return ""
        return f"; held for it: {', '.join(held)} (no job behind it is admitted into their GPUs)"

    def blocked_note(self, demand: GangDemand, names: Sequence[str]) -> str:
        """Which gangs ahead of it hold the nodes it could use: what it waits for."""
        holders: dict[str, list[str]] = {}
        for name in names:
            holder = self.of(demand).held_by.get(name)
            if holder is not None and holder.key != demand.key:
                holders.setdefault(holder.key, []).append(name)
        if not holders:
            return ""
        ahead = {d.key: d for d in self.ordered}
        parts = [
            f"{', '.join(held)} held for {key} (priority {ahead[key].priority})"
            for key, held in holders.items()
        ]
        return f"; {'; '.join(parts)}"

    # --- preemption -------------------------------------------------------------------------------
    def candidates(
        self, demand: GangDemand, names: Sequence[str], over_quota: bool, *, include_young: bool
    ) -> list[Candidate]:
        usable = {n for n in names if not self.held_for_another(n, demand)}
        result = []
        for gang in self.ordered:
            if not gang.admitted or gang.priority >= demand.priority or gang.key in self.plan.preempt:
                continue
            if gang.gpu_resource != demand.gpu_resource:
                continue  # its GPUs are of another kind: freeing them doesn't help
            if over_quota and gang.namespace != demand.namespace:
                continue  # a namespace at its quota preempts only within itself
            if not include_young and self.young_for(gang) > 0:
                continue
            frees = {n: gang.gpus_per_node for n in self.occupied.get(gang.key, ()) if n in usable}
            if frees:
                result.append(Candidate(gang.key, gang.priority, gang.total_gpus, gang.admitted_at, frees))
        return result

    def young_for(self, gang: GangDemand) -> float:
        """Seconds until `gang` has run its minimum run time (0 when it may be preempted now)."""
        if self.min_run_seconds <= 0:
            return 0.0
        if gang.admitted_at is None or self.now is None:
            return self.min_run_seconds
        ran = (self.now - gang.admitted_at).total_seconds()
        return max(0.0, self.min_run_seconds - ran)

    def search(
        self,
        demand: GangDemand,
        names: Sequence[str],
        over_quota: bool,
        limit: int | None,
        used: int,
        *,
        include_young: bool,
    ) -> tuple[list[Candidate], list[str]] | None:
        if not demand.may_preempt or demand.gpus_per_node == 0:
            return None
        candidates = self.candidates(demand, names, over_quota, include_young=include_young)
        quota_to_free = used + demand.total_gpus - limit if over_quota and limit is not None else 0
        usable = {
            n: v for n, v in self.usable_later(demand, names).items() if not self.held_for_another(n, demand)
        }
        found = select_victims(usable, demand.nodes, demand.gpus_per_node, candidates, quota_to_free)
        if found is None:
            return None
        by_key = {c.key: c for c in candidates}
        return [by_key[key] for key in found.keys], found.placement

    def preempt_for(
        self, demand: GangDemand, names: Sequence[str], over_quota: bool, limit: int | None, used: int
    ) -> Waiting | None:
        found = self.search(demand, names, over_quota, limit, used, include_young=False)
        if found is None:
            return None
        victims, placement = found
        listed = ", ".join(f"{v.key} (priority {v.priority})" for v in victims)
        message = (
            f"preempted by {demand.key} (priority {demand.priority}), which needs "
            f"{_gangs(demand.nodes)} {TIMES} {demand.gpus_per_node} GPUs on {', '.join(placement)}; "
            "resumes from its newest checkpoint when GPUs are free again"
        )
        by_key = {d.key: d for d in self.ordered}
        for victim in victims:
            gang = by_key[victim.key]
            self.plan.preempt[victim.key] = Preemption(demand.key, demand.priority, message)
            ns = gang.namespace
            self.used_by_namespace[ns] = self.used_by_namespace.get(ns, 0) - gang.total_gpus
            for name in self.occupied.get(victim.key, ()):
                self.of(gang).freeing[name] += gang.gpus_per_node
        self.hold(demand, placement)
        self.hold_quota(demand)
        return Waiting(
            PREEMPTING,
            f"preempting {listed} to free {_gangs(demand.nodes)} {TIMES} {demand.gpus_per_node} GPUs; "
            f"waiting for them to save a checkpoint and stop{self.held_note(demand)}",
        )

    def later_preemption_note(
        self, demand: GangDemand, names: Sequence[str], over_quota: bool, limit: int | None, used: int
    ) -> str:
        """When only the minimum run time protects the gangs it would preempt: say when it may."""
        if self.min_run_seconds <= 0:
            return ""
        found = self.search(demand, names, over_quota, limit, used, include_young=True)
        if found is None:
            return ""
        victims, _ = found
        by_key = {d.key: d for d in self.ordered}
        wait = max(self.young_for(by_key[v.key]) for v in victims)
        listed = ", ".join(f"{v.key} (priority {v.priority})" for v in victims)
        return (
            f"; may preempt {listed} in {_seconds(wait)}, once they have run the minimum run time "
            f"of {_seconds(self.min_run_seconds)}"
        )


def plan_admission(
    nodes: Sequence[NodeGpus],
    demands: Sequence[GangDemand],
    quota_by_namespace: Mapping[str, int] | None = None,
    *,
    policy: AdmissionPolicy = AdmissionPolicy.BEST_EFFORT,
    now: datetime | None = None,
    min_run_seconds: float = 0.0,
) -> AdmissionPlan:
    """Reserve GPUs for admitted gangs, then, in order, admit, hold for, or preempt for each waiting one
    (see the module docstring). Admitted gangs whose pods are not bound yet keep their GPUs reserved, so
    two gangs are never admitted into the same free GPUs. `now` and `min_run_seconds` decide which gangs
    have run long enough to be preempted."""
    state = _Pass(nodes, demands, dict(quota_by_namespace or {}), policy, now, min_run_seconds)
    state.reserve_admitted()
    state.place_waiting()
    return state.plan
