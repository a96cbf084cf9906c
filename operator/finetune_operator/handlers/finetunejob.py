"""Thin kopf handler for FineTuneJobs: every event feeds the cache and, when it matters, the work queue."""

from __future__ import annotations

from typing import Any

import kopf

from finetune_operator.api.common import GROUP, VERSION
from finetune_operator.api.finetunejob import PLURAL
from finetune_operator.controllers.cache import key_of
from finetune_operator.controllers.finetunejob import forget_finetunejob
from finetune_operator.handlers.indexes import runtime_of


@kopf.on.event(GROUP, VERSION, PLURAL)
async def finetunejob_seen(*, event: kopf.RawEvent, body: kopf.Body, memo: Any, **kwargs: Any) -> None:
    """The one trigger for FineTuneJobs: keep the latest body for the reconciler (no GET per reconcile)
    and enqueue when it is new, its spec changed or its deletion began. No kopf change handlers or timers
    on this kind, so kopf writes nothing to the object: no diff-base annotation, no kopf finalizer (ours is
    managed by the reconciler)."""
    runtime = runtime_of(memo, kwargs)
    key = key_of(body)
    if event["type"] == "DELETED":
        runtime.record_deleted(body)
        forget_finetunejob(runtime, key)
        return
    if runtime.cache.observe(body):
        runtime.gang.capacity_changed()  # new or changed demand (size, priority, suspend)
        runtime.enqueue(key)
