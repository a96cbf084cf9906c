"""Conditions (type, status, reason, message, lastTransitionTime, observedGeneration), for every kind.

Pure (kubernetes API conventions); the controller decides, this module records. Which condition types a kind
has, their order and the phase derived from them belong to the kind (e.g. `api/finetunejob_status.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from finetune_operator.timestamps import rfc3339

Conditions = list[dict[str, Any]]


def find(conditions: Sequence[dict[str, Any]], type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def is_true(conditions: Sequence[dict[str, Any]], type_: str) -> bool:
    found = find(conditions, type_)
    return bool(found and found.get("status") == "True")


def set_condition(
    conditions: Sequence[dict[str, Any]],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    *,
    generation: int,
    now: datetime,
    order: Sequence[str] = (),
) -> Conditions:
    """A new list with `type_` set; `lastTransitionTime` moves only when the status flips.

    The list is sorted by `order` (the kind's condition types); types not in it keep their place after."""
    value = "True" if status else "False"
    result: Conditions = []
    replaced = False
    for condition in conditions:
        if condition.get("type") != type_:
            result.append(dict(condition))
            continue
        replaced = True
        changed = condition.get("status") != value
        result.append(
            {
                "type": type_,
                "status": value,
                "reason": reason,
                "message": message,
                "lastTransitionTime": rfc3339(now) if changed else condition.get("lastTransitionTime"),
                "observedGeneration": generation,
            }
        )
    if not replaced:
        result.append(
            {
                "type": type_,
                "status": value,
                "reason": reason,
                "message": message,
                "lastTransitionTime": rfc3339(now),
                "observedGeneration": generation,
            }
        )
    rank = {t: i for i, t in enumerate(order)}
    return sorted(result, key=lambda c: rank.get(str(c.get("type")), len(rank)))
