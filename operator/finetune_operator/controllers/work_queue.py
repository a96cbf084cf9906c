"""The one work queue of the operator, shared by every kind.

Every trigger (an event on one of our resources, the drift-check loop, an event on one of our children,
capacity freed elsewhere) only enqueues an `ObjectKey`; workers reconcile a key at most once at a time and
coalesce triggers that arrive meanwhile, like controller-runtime's workqueue. A reconcile may ask to run
again after a delay (backoff, deadline, TTL); a reconcile that raises is retried with exponential backoff.
The queue itself knows nothing of kinds: `by_kind` routes each key to the reconciler registered for it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Generic, NamedTuple, TypeVar

from finetune_operator.metrics import OperatorMetrics

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)


class ObjectKey(NamedTuple):
    """What the queue holds: one object of one of our kinds."""

    kind: str
    namespace: str
    name: str

    @property
    def ref(self) -> str:
        """`namespace/name`: the key of the object within its kind (indexes, admission, gauges)."""
        return f"{self.namespace}/{self.name}"

    def __str__(self) -> str:
        return f"{self.kind} {self.ref}"


Reconcile = Callable[[K], Awaitable[float | None]]
"""Reconcile one key; return seconds until it wants to run again, or None."""


class WorkQueue(Generic[K]):
    """Keys to reconcile; one worker per key at a time; delayed requeues; failures retried with backoff."""

    def __init__(self, reconcile: Reconcile[K], workers: int) -> None:
        self._reconcile = reconcile
        self._workers = workers
        self._queue: asyncio.Queue[K] = asyncio.Queue()
        self._queued: set[K] = set()
        self._active: set[K] = set()
        self._dirty: set[K] = set()
        self._timers: dict[K, asyncio.TimerHandle] = {}
        self._failures: dict[K, int] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(), name=f"reconcile-{i}") for i in range(self._workers)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for handle in self._timers.values():
            handle.cancel()

    def enqueue(self, key: K) -> None:
        if key in self._active:
            self._dirty.add(key)  # run again once the current reconcile of this key ends
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def enqueue_after(self, key: K, delay: float) -> None:
        """Reconcile `key` in `delay` seconds unless a timer for it already fires sooner."""
        loop = asyncio.get_running_loop()
        when = loop.time() + max(0.0, delay)
        existing = self._timers.get(key)
        if existing is not None and not existing.cancelled() and existing.when() <= when:
            return
        if existing is not None:
            existing.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.enqueue(key)

    def forget(self, key: K) -> None:
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


def by_kind(
    reconcilers: Mapping[str, Reconcile[ObjectKey]], metrics: OperatorMetrics
) -> Reconcile[ObjectKey]:
    """One reconcile for the queue: the reconciler registered for the key's kind, timed per kind."""

    async def reconcile(key: ObjectKey) -> float | None:
        try:
            reconciler = reconcilers[key.kind]
        except KeyError:
            raise LookupError(f"no reconciler registered for kind {key.kind!r} ({key})") from None
        with metrics.time_reconcile(key.kind):
            return await reconciler(key)

    return reconcile
