"""Dynamic batching with a bounded queue, deadlines and cancellation.

Requests are *admitted* (or refused with 429 and a ``Retry-After`` when ``limits.maxQueuedRequests`` are
already admitted and unfinished), then wait in a queue. One worker thread takes up to
``batching.maxBatchSize`` of them — the first waits at most ``batching.maxWaitMs`` for others to join — and
runs them as one batch through the model's ``run_batch``. A request whose deadline passes, or whose client
goes away, is marked cancelled: it is dropped from the queue if it has not started, and a running batch
stops generating for it at the next step (``Work.cancelled``), so it stops using the model.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from finetune_server.errors import RequestTimeoutError, TooManyRequestsError

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Work:
    """One admitted request. ``run_batch`` reads ``payload`` and calls ``emit``/``finish``/``fail``."""

    payload: Any
    deadline: float
    loop: asyncio.AbstractEventLoop
    #: Receives streamed pieces (on the event loop); None for non-streaming requests.
    on_piece: Callable[[Any], None] | None = None
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished_at: float | None = None
    cancelled: bool = False
    future: asyncio.Future[Any] = field(init=False)

    def __post_init__(self) -> None:
        self.future = self.loop.create_future()

    @property
    def expired(self) -> bool:
        return self.cancelled or time.monotonic() > self.deadline

    def emit(self, piece: Any) -> None:
        if self.on_piece is not None:
            self.loop.call_soon_threadsafe(self.on_piece, piece)

    def finish(self, result: Any) -> None:
        self.finished_at = time.monotonic()
        self.loop.call_soon_threadsafe(_resolve, self.future, result, None)

    def fail(self, error: BaseException) -> None:
        self.loop.call_soon_threadsafe(_resolve, self.future, None, error)


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    seconds: float = 0.0


class Batcher:
    def __init__(
        self,
        run_batch: Callable[[list[Work]], None],
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queued: int,
        timeout_s: float,
        name: str = "batcher",
    ) -> None:
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queued = max_queued
        self.timeout_s = timeout_s
        self.stats = BatchStats()
        self._pending: collections.deque[Work] = collections.deque()
        self._admitted = 0
        self._running = 0
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._worker, name=name, daemon=True)
        self._thread.start()

    # --------------------------------------------------------------------------------- observed figures
    @property
    def waiting(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return self._running

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead, at the mean batch duration so far."""
        mean = self.stats.seconds / self.stats.batches if self.stats.batches else 1.0
        return max(1, math.ceil(mean * max(1, self._admitted) / self.max_batch_size))

    # ------------------------------------------------------------------------------------------ submit
    async def submit(self, payload: Any, on_piece: Callable[[Any], None] | None = None) -> Any:
        """Admit, wait for the result; 429 when full, 504 (and cancellation) past the deadline."""
        work = self.admit(payload, on_piece)
        return await self.wait(work)

    def admit(self, payload: Any, on_piece: Callable[[Any], None] | None = None) -> Work:
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._admitted >= self.max_queued:
                raise TooManyRequestsError(
                    f"the server is at its limit of {self.max_queued} queued requests "
                    "(limits.maxQueuedRequests); retry later",
                    retry_after=self.retry_after(),
                )
            work = Work(payload, time.monotonic() + self.timeout_s, loop, on_piece)
            self._admitted += 1
            self._pending.append(work)
            self._cond.notify()
        work.future.add_done_callback(lambda _: self._release())
        return work

    async def wait(self, work: Work) -> Any:
        late = RequestTimeoutError(
            f"the request ran past limits.requestTimeoutSeconds ({self.timeout_s:g}s) and was cancelled"
        )
        try:
            result = await asyncio.wait_for(
                asyncio.shield(work.future), timeout=max(0.0, work.deadline - time.monotonic())
            )
        except TimeoutError:
            self.cancel(work)
            raise late from None
        except asyncio.CancelledError:  # the client went away
            self.cancel(work)
            raise
        if work.finished_at is not None and work.finished_at > work.deadline:
            raise late  # the worker cut it short at the deadline just before the wait gave up
        return result

    def cancel(self, work: Work) -> None:
        work.cancelled = True
        with self._cond:
            if work in self._pending:
                self._pending.remove(work)
                work.fail(RequestTimeoutError("cancelled before it started"))

    def _release(self) -> None:
        with self._cond:
            self._admitted -= 1

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    # ------------------------------------------------------------------------------------------ worker
    def _take(self) -> list[Work] | None:
        with self._cond:
            while not self._pending and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return None
            first = self._pending[0]
            while len(self._pending) < self.max_batch_size and not self._stopped:
                left = first.enqueued + self.max_wait_s - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch: list[Work] = []
            while self._pending and len(batch) < self.max_batch_size:
                work = self._pending.popleft()
                if work.expired:
                    work.fail(RequestTimeoutError("the request's deadline passed while it waited"))
                    continue
                batch.append(work)
            self._running = len(batch)
            return batch

    def _worker(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            if not batch:
                continue
            started = time.monotonic()
            for work in batch:
                work.started = started
            try:
                self.run_batch(batch)
            except Exception as exc:  # one bad batch answers its requests with the error, the worker lives on
                log.exception("batch of %d failed", len(batch))
                for work in batch:
                    work.fail(exc)
            finally:
                self._running = 0
                self.stats.batches += 1
                self.stats.items += len(batch)
                self.stats.seconds += time.monotonic() - started
