"""Which running gangs a waiting gang preempts: the fewest and lowest whose removal lets it fit. Pure.

The rules (documented in docs/operator.md, "Preemption"):

- only gangs of strictly lower priority are candidates, never equal ones;
- a candidate must have run its minimum run time since it was admitted (no thrashing);
- a candidate must hold GPUs on nodes the waiting gang can use (its GPU product, node selector and
  tolerations): a job only preempts on nodes of the product it needs;
- a waiting gang held back by its namespace's GPU quota frees quota only within its namespace (the caller
  passes only that namespace's gangs and the GPUs to free);
- among the sets that work, the highest victim priority is as low as it can be (a priority-50 job is never
  preempted while priority-0 ones would do), then the set is as small as it can be, then its priorities as
  low as they can be; remaining ties go to the most recently admitted (the least work lost).

Finding the smallest set is a small set-cover search; it is exhaustive up to `MAX_VICTIM_SETS` evaluated
sets (a handful of running gangs on the nodes in question is the normal case) and greedy beyond that:
lowest first until the gang fits, then every victim that is not needed after all is spared again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import combinations

from finetune_operator.scheduling.placement import place_gang

MAX_VICTIM_SETS = 4096
"""Candidate sets tried exhaustively before the greedy search takes over (bounds one admission pass)."""


@dataclass(frozen=True)
class Candidate:
    """A running gang that could be preempted, and what its removal frees for the waiting gang."""

    key: str
    priority: int
    gpus: int
    """All GPUs it holds (what its namespace's quota gets back)."""
    admitted_at: datetime | None
    frees: Mapping[str, int] = field(default_factory=dict)
    """GPUs it would free on each node that the waiting gang can use."""


_Fits = Callable[[Sequence["Candidate"]], list[str] | None]
"""Where the waiting gang goes if the given candidates are removed; None if it still doesn't fit."""


@dataclass(frozen=True)
class Victims:
    keys: tuple[str, ...]
    """Preempted gangs, lowest priority first."""
    placement: list[str]
    """Where the waiting gang goes once they are gone."""


def _order(candidate: Candidate) -> tuple[int, float, str]:
    newest_first = -candidate.admitted_at.timestamp() if candidate.admitted_at else 0.0
    return (candidate.priority, newest_first, candidate.key)


def select_victims(
    free: Mapping[str, int],
    nodes: int,
    gpus_per_node: int,
    candidates: Sequence[Candidate],
    quota_to_free: int = 0,
) -> Victims | None:
    """The gangs to preempt so that `nodes` pieces of `gpus_per_node` fit into `free` (the waiting gang's
    usable nodes, counting GPUs already being freed), and at least `quota_to_free` GPUs of quota come
    back; None when no set of candidates does it."""
    useful = sorted((c for c in candidates if any(g > 0 for g in c.frees.values())), key=_order)

    def fits(chosen: Sequence[Candidate]) -> list[str] | None:
        if sum(c.gpus for c in chosen) < quota_to_free:
            return None
        pool = dict(free)
        for candidate in chosen:
            for name, gpus in candidate.frees.items():
                pool[name] = pool.get(name, 0) + gpus
        return place_gang(pool, nodes, gpus_per_node)

    for ceiling in sorted({c.priority for c in useful}):
        allowed = [c for c in useful if c.priority <= ceiling]
        if fits(allowed) is None:
            continue
        return _smallest(allowed, fits) or _greedy(allowed, fits)
    return None


def _smallest(allowed: Sequence[Candidate], fits: _Fits) -> Victims | None:
    """The smallest fitting set, lowest priorities among equals; None if the search would be too long."""
    tried = 0
    for size in range(1, len(allowed) + 1):
        best: tuple[tuple[int, ...], int, tuple[Candidate, ...], list[str]] | None = None
        for index, chosen in enumerate(combinations(allowed, size)):
            tried += 1
            if tried > MAX_VICTIM_SETS:
                return None
            placement = fits(chosen)
            if placement is None:
                continue
            rank = (tuple(sorted((c.priority for c in chosen), reverse=True)), index)
            if best is None or rank < best[:2]:
                best = (rank[0], rank[1], chosen, placement)
        if best is not None:
            return Victims(tuple(c.key for c in best[2]), best[3])
    return None


def _greedy(allowed: Sequence[Candidate], fits: _Fits) -> Victims:
    """Lowest first until it fits, then spare (highest first) every victim that is not needed."""
    chosen: list[Candidate] = []
    for candidate in allowed:
        chosen.append(candidate)
        if fits(chosen) is not None:
            break
    for candidate in reversed(list(chosen)):
        rest = [c for c in chosen if c is not candidate]
        if fits(rest) is not None:
            chosen = rest
    placement = fits(chosen)
    assert placement is not None, "the caller checked that all allowed candidates together fit"
    return Victims(tuple(c.key for c in chosen), placement)
