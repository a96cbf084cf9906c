"""Operator-wide state shared by handlers and reconcilers (kept in kopf's `memo`).

The work queue is the wake-up design: every trigger (FineTuneJob create/update/resume, the drift timer,
an event on one of our Jobs or Pods, capacity freed elsewhere) only enqueues the owner's key; workers
reconcile a key at most once at a time and coalesce triggers that arrive meanwhile, like
controller-runtime's workqueue. A reconcile may ask to run again after a delay (backoff, deadline, TTL).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from finetune_operator.config import OperatorConfig
from finetune_operator.k8s import KubeClient
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.scheduling import AdmissionPlan, Preemption

logger = logging.getLogger(__name__)

Reconciler = Callable[[str], Awaitable[float | None]]


class ReconcileQueue:
    """Keys to reconcile; one worker per key at a time; delayed requeues; failures retried with backoff."""

    def __init__(self, reconcile: Reconciler, workers: int) -> None:
        self._reconcile = reconcile
        self._workers = workers
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._active: set[str] = set()
        self._dirty: set[str] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._failures: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(), name=f"reconcile-{i}") for i in range(self._workers)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for handle in self._timers.values():
            handle.cancel()

    def enqueue(self, key: str) -> None:
        if key in self._active:
            self._dirty.add(key)  # run again once the current reconcile of this key ends
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def enqueue_after(self, key: str, delay: float) -> None:
        """Reconcile `key` in `delay` seconds unless a timer for it already fires sooner."""
        loop = asyncio.get_running_loop()
        when = loop.time() + max(0.0, delay)
        existing = self._timers.get(key)
        if existing is not None and not existing.cancelled() and existing.when() <= when:
            return
        if existing is not None:
            existing.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        self.enqueue(key)

    def forget(self, key: str) -> None:
        handle = self._timers.pop(key, None)
        if handle is not None:
            handle.cancel()
        self._failures.pop(key, None)

    @property
    def depth(self) -> int:
        return len(self._queued)

    async def _work(self) -> None:
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            self._active.add(key)
            try:
                requeue = await self._reconcile(key)
                self._failures.pop(key, None)
                if requeue is not None:
                    self.enqueue_after(key, requeue)
            except asyncio.CancelledError:
                raise
            except Exception:
                failures = self._failures.get(key, 0) + 1
                self._failures[key] = failures
                delay = min(60.0, 0.5 * 2**failures) * random.uniform(0.8, 1.2)
                logger.exception(
                    "reconcile of %s failed (%d in a row); retrying in %.1fs", key, failures, delay
                )
                self.enqueue_after(key, delay)
            finally:
                self._active.discard(key)
                if key in self._dirty:
                    self._dirty.discard(key)
                    self.enqueue(key)


class SpecDemand(NamedTuple):
    """What admission needs from a FineTuneJob's spec (parsed once per generation)."""

    priority: int
    nodes: int
    gpus_per_node: int
    node_selector: tuple[tuple[str, str], ...]
    tolerations: tuple[Mapping[str, Any], ...]
    queue_name: str | None
    suspend: bool
    may_preempt: bool = False
    """`scheduling.preemptionPolicy: PreemptLowerPriority`."""


class FtjSummary(NamedTuple):
    """What admission needs to know about one FineTuneJob (a kopf index value)."""

    key: str
    namespace: str
    created: datetime
    spec: SpecDemand
    terminal: bool
    admitted: bool
    phase: str
    admitted_at: datetime | None = None
    """`status.admission.admittedAt`: the minimum run time before a preemption counts from here."""


@dataclass
class Runtime:
    client: KubeClient
    config: OperatorConfig
    metrics: OperatorMetrics
    queue: ReconcileQueue | None = None
    indexes: dict[str, Any] = field(default_factory=dict)
    """kopf indexes (`trainer_jobs`, `trainer_pods`, `finetunejobs`), captured from handler kwargs."""
    admitted_override: dict[str, bool] = field(default_factory=dict)
    """Admission decisions made here that the FineTuneJob index may not show yet (it lags the patch)."""
    admission_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    capacity_generation: int = 0
    """Bumped whenever capacity or demand may have changed; a plan older than this is recomputed."""
    plan: AdmissionPlan | None = None
    plan_generation: int = -1
    plan_time: float = 0.0
    placements: dict[str, list[str]] = field(default_factory=dict)
    preemptions: dict[str, Preemption] = field(default_factory=dict)
    """Gangs the admission plan preempted whose reconcile has not stopped them yet."""
    applied_generation: dict[str, int] = field(default_factory=dict)
    """metadata.generation whose children were last applied, per job (a restart re-applies everything)."""
    phases: dict[str, str] = field(default_factory=dict)
    bodies: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Latest known FineTuneJob bodies, from the watch and from our own writes' responses (an informer
    cache: it never goes back to an older resourceVersion, so a reconcile sees at least its own writes)."""
    gpus: dict[str, tuple[int, int]] = field(default_factory=dict)
    """(requested, admitted) GPUs per job, for the gauges."""
    demands: dict[str, tuple[str, int, SpecDemand | None]] = field(default_factory=dict)
    """(uid, generation, demand) per job: the spec is parsed once per generation, not on every status
    write (the trainer's progress reports are most of a running job's events); None if invalid."""

    background: set[asyncio.Task[Any]] = field(default_factory=set)
    """Fire-and-forget work (Events): referenced until done so it isn't garbage-collected mid-flight."""

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def remember(self, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = f"{meta.get('namespace')}/{meta.get('name')}"
        known = self.bodies.get(key)
        same_object = known is not None and known["metadata"].get("uid") == meta.get("uid")
        if same_object and known is not None and _version(known) > _version(body):
            return
        self.bodies[key] = dict(body)

    def record(self, key: str, phase: str, requested: int, admitted: int) -> None:
        self.phases[key] = phase
        self.gpus[key] = (requested, admitted)
        self.update_gauges()

    def update_gauges(self) -> None:
        self.metrics.set_phases(self.phases)
        self.metrics.gpus_requested.set(sum(r for r, _ in self.gpus.values()))
        self.metrics.gpus_admitted.set(sum(a for _, a in self.gpus.values()))

    def enqueue(self, key: str) -> None:
        if self.queue is not None:
            self.queue.enqueue(key)

    def resync(self) -> None:
        """Re-apply children and re-read state of every known job, spread over the next interval: a
        drift check (someone edited or deleted a child behind our back), like controller-runtime's
        SyncPeriod. One loop for all jobs instead of a kopf timer per job (which would need a finalizer
        and a diff-base on every object)."""
        spread = self.config.drift_check_seconds
        for key in list(self.bodies):
            self.applied_generation.pop(key, None)
            if self.queue is not None:
                self.queue.enqueue_after(key, random.uniform(0, spread))

    def capacity_changed(self) -> None:
        """Demand or free GPUs changed: recompute the plan and wake every job still waiting."""
        self.capacity_generation += 1
        for key, phase in list(self.phases.items()):
            if phase in ("Queued", "Pending"):
                self.enqueue(key)

    def forget(self, key: str) -> None:
        self.admitted_override.pop(key, None)
        self.placements.pop(key, None)
        self.preemptions.pop(key, None)
        self.applied_generation.pop(key, None)
        self.phases.pop(key, None)
        self.gpus.pop(key, None)
        self.bodies.pop(key, None)
        self.demands.pop(key, None)
        if self.queue is not None:
            self.queue.forget(key)
        self.update_gauges()


def _version(body: Mapping[str, Any]) -> int:
    """resourceVersion as a number (etcd revisions); unparsable ones sort first, so the newer one wins."""
    try:
        return int((body.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0
