"""The kind-generic status writer: collects the operator-owned status fields during one reconcile, then
merge-patches only what changed, posts an Event on every phase transition and reports to the metrics.

What differs between kinds is passed in as `StatusRules` (the fields the operator owns, the condition order,
how the phase is derived and which condition explains it); the writer itself knows no kind.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from finetune_operator.api.conditions import find, set_condition
from finetune_operator.controllers.runtime import Runtime

logger = logging.getLogger(__name__)

Conditions = Sequence[dict[str, Any]]


@dataclass(frozen=True)
class StatusRules:
    """What one kind tells the status writer."""

    owned_fields: tuple[str, ...]
    """Top-level status fields the operator writes; any other (e.g. the trainer's progress) is left alone."""
    condition_order: tuple[str, ...]
    """The order of `status.conditions`."""
    derive_phase: Callable[[Conditions], str] | None = None
    """`status.phase` from the conditions; None for a kind without a phase."""
    explained_by: Mapping[str, str] = field(default_factory=dict)
    """Per phase, the condition whose reason and message the transition Event carries."""
    fallback_condition: str | None = None
    """The condition that explains a phase whose own condition is absent."""
    warning_phases: frozenset[str] = frozenset()
    """Phases whose transition Event is a Warning."""


class StatusWriter:
    """Collects the operator-owned status fields, then patches only what changed and posts Events."""

    def __init__(
        self,
        runtime: Runtime,
        body: dict[str, Any],
        now: datetime,
        rules: StatusRules,
        *,
        on_commit: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> None:
        self.runtime = runtime
        self.body = body
        self.now = now
        self.rules = rules
        self.on_commit = on_commit
        """Called with the fields at every commit (changed or not): the kind's gauges."""
        self.generation = int(body["metadata"].get("generation") or 0)
        status = body.get("status") or {}
        self.original = {k: copy.deepcopy(status.get(k)) for k in rules.owned_fields}
        self.fields: dict[str, Any] = copy.deepcopy(self.original)
        self.fields["conditions"] = list(self.fields.get("conditions") or [])

    @property
    def conditions(self) -> list[dict[str, Any]]:
        return list(self.fields["conditions"])

    @property
    def ref(self) -> str:
        meta = self.body["metadata"]
        return f"{meta['namespace']}/{meta['name']}"

    def set(self, type_: str, status: bool, reason: str, message: str) -> None:
        self.fields["conditions"] = set_condition(
            self.fields["conditions"],
            type_,
            status,
            reason,
            message,
            generation=self.generation,
            now=self.now,
            order=self.rules.condition_order,
        )

    async def commit(self) -> None:
        self.fields["observedGeneration"] = self.generation
        if self.rules.derive_phase is not None:
            self.fields["phase"] = self.rules.derive_phase(self.fields["conditions"])
        if self.on_commit is not None:
            self.on_commit(self.fields)
        changed = {k: v for k, v in self.fields.items() if v != self.original.get(k)}
        if not changed:
            return
        meta = self.body["metadata"]
        updated = await self.runtime.client.patch_status(
            self.body["apiVersion"], self.body["kind"], meta["name"], meta["namespace"], changed
        )
        if updated is not None:
            self.runtime.cache.remember(updated)
        old_phase, new_phase = self.original.get("phase"), self.fields.get("phase")
        if old_phase != new_phase and new_phase is not None:
            reason, message = self._why(new_phase)
            warning = new_phase in self.rules.warning_phases
            logger.info("%s: %s -> %s (%s) %s", self.ref, old_phase, new_phase, reason, message)
            self.runtime.spawn(
                self.runtime.client.post_event(
                    self.body, type_="Warning" if warning else "Normal", reason=reason, message=message
                )
            )
        self.original = copy.deepcopy(self.fields)

    def _why(self, phase: str) -> tuple[str, str]:
        conditions = self.fields["conditions"]
        condition = None
        explaining = self.rules.explained_by.get(phase)
        if explaining is not None:
            condition = find(conditions, explaining)
        if condition is None and self.rules.fallback_condition is not None:
            condition = find(conditions, self.rules.fallback_condition)
        if condition is None:
            return phase, f"phase is now {phase}"
        return str(condition.get("reason") or phase), str(condition.get("message") or f"phase is now {phase}")
