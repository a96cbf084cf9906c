"""Thin kopf handler for ModelDeployments: every event feeds the cache and, when it matters, the work queue.

As for FineTuneJobs, no kopf change handlers: kopf keeps no diff-base annotation and no finalizer on the
object; the ModelDeployment reconciler runs on the shared work queue.
"""

from __future__ import annotations

from typing import Any

import kopf

from finetune_operator.api.common import GROUP, VERSION
from finetune_operator.api.modeldeployment import PLURAL
from finetune_operator.controllers.cache import key_of
from finetune_operator.handlers.indexes import runtime_of


@kopf.on.event(GROUP, VERSION, PLURAL)
async def modeldeployment_seen(*, event: kopf.RawEvent, body: kopf.Body, memo: Any, **kwargs: Any) -> None:
    runtime = runtime_of(memo, kwargs)
    key = key_of(body)
    if event["type"] == "DELETED":
        runtime.record_deleted(body)
        runtime.forget(key)
        return
    if runtime.cache.observe(body):
        runtime.enqueue(key)
