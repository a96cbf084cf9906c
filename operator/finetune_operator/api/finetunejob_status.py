"""How a FineTuneJob's status reads: its phase derived from its conditions, and when it is terminal.

Pure, beside the FineTuneJob API (`api/finetunejob.py` declares the condition types); the kind-generic status
writer (`controllers/status.py`) is given these by the FineTuneJob controller.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from finetune_operator.api.conditions import find, is_true
from finetune_operator.api.finetunejob import (
    CONDITION_ADMITTED,
    CONDITION_FAILED,
    CONDITION_RUNNING,
    CONDITION_SUCCEEDED,
    CONDITION_SUSPENDED,
    CONDITION_TYPES,
)

REASON_RESTARTING = "Restarting"
"""Reason of `Running=False` while a whole-gang restart is under way (phase `Restarting`)."""

CONDITION_ORDER = CONDITION_TYPES
"""The order of `status.conditions`."""

RELEASED_PHASES = ("Succeeded", "Failed", "Suspended")
"""Phases in which no pod of the job runs (no GPUs held, no finalizer needed)."""

WARNING_PHASES = frozenset({"Failed", "Restarting"})
"""Transitions into these phases post a Warning Event (the others a Normal one)."""

EXPLAINED_BY: Mapping[str, str] = {
    "Failed": CONDITION_FAILED,
    "Succeeded": CONDITION_SUCCEEDED,
    "Suspended": CONDITION_SUSPENDED,
    "Restarting": CONDITION_RUNNING,
    "Running": CONDITION_RUNNING,
    "Queued": CONDITION_ADMITTED,
    "Pending": CONDITION_RUNNING,
}
"""The condition whose reason and message explain each phase (in its transition Event)."""

Conditions = Sequence[dict[str, Any]]


def derive_phase(conditions: Conditions) -> str:
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


def is_terminal(conditions: Conditions) -> bool:
    return is_true(conditions, CONDITION_SUCCEEDED) or is_true(conditions, CONDITION_FAILED)
