"""Conditions and the phase derived from them. Pure; the controller decides, this module records."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from finetune_operator.api.finetunejob import (
    CONDITION_ADMITTED,
    CONDITION_FAILED,
    CONDITION_RUNNING,
    CONDITION_SUCCEEDED,
    CONDITION_SUSPENDED,
    CONDITION_TYPES,
)

REASON_RESTARTING = "Restarting"

Conditions = list[dict[str, Any]]


def rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


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
) -> Conditions:
    """A new list with `type_` set; `lastTransitionTime` moves only when the status flips."""
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
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    return sorted(result, key=lambda c: order.get(str(c.get("type")), len(order)))


def derive_phase(conditions: Sequence[dict[str, Any]]) -> str:
    """Pending, Queued, Running, Restarting, Succeeded, Failed or Suspended, from the conditions alone."""
    if is_true(conditions, CONDITION_FAILED):
        return "Failed"
    if is_true(conditions, CONDITION_SUCCEEDED):
        return "Succeeded"
    if is_true(conditions, CONDITION_SUSPENDED):
        return "Suspended"
    running = find(conditions, CONDITION_RUNNING)
    if running and running.get("status") == "True":
        return "Running"
    if running and running.get("reason") == REASON_RESTARTING:
        return "Restarting"
    admitted = find(conditions, CONDITION_ADMITTED)
    if admitted and admitted.get("status") == "False":
        return "Queued"
    return "Pending"


def is_terminal(conditions: Sequence[dict[str, Any]]) -> bool:
    return is_true(conditions, CONDITION_SUCCEEDED) or is_true(conditions, CONDITION_FAILED)
