"""Gang placement: every node-sized piece of a job on its own node, all at once or not at all."""

from __future__ import annotations

from collections.abc import Collection, Mapping


def place_gang(
    free: Mapping[str, int], pieces: int, gpus_per_piece: int, exclude: Collection[str] = ()
) -> list[str] | None:
    """Distinct nodes for `pieces` pieces of `gpus_per_piece` GPUs, or None if the gang doesn't fit.

    Best fit: the nodes with the least sufficient free GPUs are used first, so large holes stay open
    for large jobs. `free` holds only nodes eligible for the job; `exclude` are nodes the gang
    already occupies (a restarted or partly running gang never gets two pieces on one node).
    """
    if pieces <= 0:
        return []
    candidates = sorted(
        (count, name) for name, count in free.items() if count >= gpus_per_piece and name not in exclude
    )
    if len(candidates) < pieces:
        return None
    return [name for _, name in candidates[:pieces]]
