"""Our child Jobs and Pods: indexed by owner and turned into wake-ups of the owner's reconcile.

No change handlers, timers or daemons here: those would put kopf annotations and finalizers on every
child. The operator's startup sets server-side label selectors, so only our own Jobs and Pods stream in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from finetune_operator.builders.common import JOB_LABEL
from finetune_operator.controllers.children import (
    JobSummary,
    PodSummary,
    owner_key,
    summarize_job,
    summarize_pod,
)
from finetune_operator.handlers.finetunejob import runtime_of

OURS = {JOB_LABEL: kopf.PRESENT}


@kopf.index("batch/v1", "jobs", labels=OURS)
async def trainer_jobs(
    *, body: kopf.Body, namespace: str | None, labels: Mapping[str, str], **_: Any
) -> dict[str, JobSummary] | None:
    key = owner_key(namespace, labels)
    return {key: summarize_job(body)} if key else None


@kopf.index("v1", "pods", labels=OURS)
async def trainer_pods(
    *, body: kopf.Body, namespace: str | None, labels: Mapping[str, str], **_: Any
) -> dict[str, PodSummary] | None:
    key = owner_key(namespace, labels)
    return {key: summarize_pod(body)} if key else None


def _wake(
    event: kopf.RawEvent,
    namespace: str | None,
    labels: Mapping[str, str],
    memo: Any,
    frees: bool,
    kwargs: Any,
) -> None:
    if event["type"] is None:
        return  # initial listing: the owners' resume handlers reconcile everything once anyway
    key = owner_key(namespace, labels)
    if key is None:
        return
    runtime = runtime_of(memo, kwargs)
    if frees or event["type"] == "DELETED":
        runtime.capacity_changed()
    runtime.enqueue(key)


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
