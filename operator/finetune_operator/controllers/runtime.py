"""The operator's process services, each in its own named part (kept in kopf's `memo` as `memo.runtime`).

A reconciler may touch exactly these: the API `client`, the `config`, the `metrics`, the work `queue`
(through `enqueue`), the `cache` of our objects' bodies and the `applied` generations, the `observed`
kopf indexes, GPU `gang` admission and the FineTuneJob `gauges`; fire-and-forget work goes through `spawn`.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Coroutine, Mapping
from typing import Any

from finetune_operator.api.common import API_VERSION
from finetune_operator.api.finetunejob import KIND as FINETUNEJOB
from finetune_operator.audit.log import AuditLog
from finetune_operator.config import OperatorConfig
from finetune_operator.controllers.cache import AppliedGenerations, ObjectCache
from finetune_operator.controllers.gang_admission import GangAdmission
from finetune_operator.controllers.observed import NothingObserved, Observed
from finetune_operator.controllers.serving_memory import ServingMemory
from finetune_operator.controllers.work_queue import ObjectKey, Reconcile, WorkQueue, by_kind
from finetune_operator.k8s import KubeClient
from finetune_operator.metrics import FineTuneJobGauges, OperatorMetrics


def finetunejob_key(ref: str) -> ObjectKey:
    """The queue key of the FineTuneJob `namespace/name`."""
    namespace, name = ref.split("/", 1)
    return ObjectKey(FINETUNEJOB, namespace, name)


class Runtime:
    def __init__(self, client: KubeClient, config: OperatorConfig, metrics: OperatorMetrics) -> None:
        self.client = client
        self.config = config
        self.metrics = metrics
        self.cache = ObjectCache()
        self.applied = AppliedGenerations()
        self.observed: Observed = NothingObserved()
        """kopf's indexes, handed over by the first handler call (`handlers/indexes.py`)."""
        self.gauges = FineTuneJobGauges(metrics)
        self.audit: AuditLog | None = None
        """The audit log; the status writer and the apply path record the operator's actions in it."""
        self.gang = GangAdmission(
            client,
            config,
            metrics,
            observed=lambda: self.observed,
            wake=lambda ref: self.enqueue(finetunejob_key(ref)),
            waiting=lambda: self.gauges.in_phases("Queued", "Pending"),
        )
        self.serving = ServingMemory()
        """The ModelDeployment reconciler's canary baselines, optional-API lookups and metric-read session."""
        self.queue: WorkQueue[ObjectKey] | None = None
        self._kinds: frozenset[str] = frozenset()
        self.background: set[asyncio.Task[Any]] = set()
        """Fire-and-forget work (Events): referenced until done so it isn't garbage-collected mid-flight."""

    def start(self, reconcilers: Mapping[str, Reconcile[ObjectKey]]) -> None:
        """Start the one work queue, with one reconciler per kind."""
        self._kinds = frozenset(reconcilers)
        self.queue = WorkQueue(by_kind(reconcilers, self.metrics), self.config.workers)
        self.queue.start()

    async def stop(self) -> None:
        for task in list(self.background):
            task.cancel()
        if self.queue is not None:
            await self.queue.stop()
        await self.serving.close()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def enqueue(self, key: ObjectKey) -> None:
        if key.kind not in self._kinds and self.queue is not None:
            raise LookupError(f"no reconciler registered for kind {key.kind!r} ({key})")
        if self.queue is not None:
            self.queue.enqueue(key)

    async def current_body(self, key: ObjectKey) -> dict[str, Any] | None:
        """The latest known body of `key`: the cache's, or read once if the watch hasn't shown it yet;
        None if it doesn't exist."""
        body = self.cache.get(key)
        if body is None:
            body = await self.client.get(API_VERSION, key.kind, key.name, key.namespace)
            if body is not None:
                self.cache.remember(body)
        return body

    def resync(self) -> None:
        """Re-apply children and re-read state of every known object, spread over the next interval: a
        drift check (someone edited or deleted a child behind our back), like controller-runtime's
        SyncPeriod. One loop for all objects instead of a kopf timer per object (which would need a
        finalizer and a diff-base on every object)."""
        spread = self.config.drift_check_seconds
        for key in self.cache.known():
            self.applied.forget(key)
            if self.queue is not None:
                self.queue.enqueue_after(key, random.uniform(0, spread))

    def record_deleted(self, body: Mapping[str, Any]) -> None:
        """The watch showed the object gone: one `Deleted` audit action (its children go with it by
        garbage collection), so a log kept without the admission webhooks still shows the deletion."""
        if self.audit is not None:
            self.audit.action("Deleted", body, detail="children removed by garbage collection")

    def forget(self, key: ObjectKey) -> None:
        """The object is gone: drop what every kind-generic part knows of it."""
        self.cache.forget(key)
        self.applied.forget(key)
        self.serving.forget(key)
        if self.queue is not None:
            self.queue.forget(key)
