"""Events on our trainer Jobs and Pods, turned into wake-ups of their FineTuneJob's reconcile.

No change handlers, timers or daemons here: those would put kopf annotations and finalizers on every
child. The operator's startup sets server-side label selectors, so only our own Jobs and Pods stream in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from finetune_operator.controllers.runtime import finetunejob_key
from finetune_operator.controllers.summaries import owner_key, summarize_job, summarize_pod
from finetune_operator.handlers.indexes import OURS, runtime_of


def _wake(
    event: kopf.RawEvent,
    namespace: str | None,
    labels: Mapping[str, str],
    memo: Any,
    frees: bool,
    kwargs: Any,
) -> None:
    if event["type"] is None:
        return  # initial listing: the owners are reconciled once anyway when they are listed
    owner = owner_key(namespace, labels)
    if owner is None:
        return
    runtime = runtime_of(memo, kwargs)
    if frees or event["type"] == "DELETED":
        runtime.gang.capacity_changed()
    runtime.enqueue(finetunejob_key(owner))


@kopf.on.event("batch/v1", "jobs", labels=OURS)
async def trainer_job_event(
    *,
    event: kopf.RawEvent,
    body: kopf.Body,
    namespace: str | None,
    labels: Mapping[str, str],
    memo: Any,
    **kwargs: Any,
) -> None:
    summary = summarize_job(body)
    _wake(event, namespace, labels, memo, summary.complete or summary.failed, kwargs)


@kopf.on.event("v1", "pods", labels=OURS)
async def trainer_pod_event(
    *,
    event: kopf.RawEvent,
    body: kopf.Body,
    namespace: str | None,
    labels: Mapping[str, str],
    memo: Any,
    **kwargs: Any,
) -> None:
    summary = summarize_pod(body)
    _wake(event, namespace, labels, memo, summary.terminated or summary.deleting, kwargs)
