"""How a canary weight becomes traffic: HTTPRoute weights, or replica counts behind one Service. Pure."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Split:
    stable_replicas: int
    canary_replicas: int
    weight: int
    """The canary's effective share of traffic in percent."""


def replica_split(stable_replicas: int, weight: int) -> Split:
    """Split by replica proportion: one Service selects both revisions' pods and spreads requests evenly
    over the ready ones, so the canary's share is its share of the replicas.

    The stable revision keeps its replicas (so an autoscaler's count is never fought over, and a rollback
    loses no capacity); the canary gets `round(stable * w / (100 - w))`, at least 1 and at most as many as
    the stable, so with few replicas the effective weight is coarse (1 stable replica: every step is
    50 %) and `status.rollout.weight` reports what it really is."""
    if not 0 <= weight <= 100:
        raise ValueError(f"weight {weight} is not a percentage")
    stable = max(stable_replicas, 1)
    if weight == 0:
        return Split(stable, 0, 0)
    if weight == 100:
        return Split(0, stable, 100)
    canary = min(stable, max(1, round(stable * weight / (100 - weight))))
    return Split(stable, canary, round(100 * canary / (stable + canary)))


def route_split(stable_replicas: int, weight: int) -> Split:
    """Split by HTTPRoute weights: the weights are exact; the canary gets replicas in proportion (at least
    one) to carry its share."""
    if not 0 <= weight <= 100:
        raise ValueError(f"weight {weight} is not a percentage")
    stable = max(stable_replicas, 1)
    if weight == 0:
        return Split(stable, 0, 0)
    canary = max(1, -(-stable * weight // 100))
    return Split(stable, canary, weight)
