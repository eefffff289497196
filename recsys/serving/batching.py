"""Micro-batching for asyncio servers: concurrent calls -> one engine call.

Each request coroutine ``await``s :meth:`MicroBatcher.submit`; one worker task collects
what is queued into a batch and runs the engine function on it **in a dedicated worker
thread** (so the event loop keeps accepting calls while torch works), then hands every
caller its own result or exception.

Collecting a batch: the first queued item opens it; everything already queued joins at
once; then the batch waits up to ``max_wait_ms`` for more, and closes at ``max_batch``
items. Under load, requests pile up while the previous batch runs, so batches fill
without waiting; when idle, a lone request waits at most ``max_wait_ms``.
``max_batch=1`` turns batching off (one engine call per request, still serialised on the
worker thread). Items whose caller went away (cancelled, deadline passed) are dropped
before the engine call.

Each item keeps its caller's trace context: with tracing on
(:mod:`recsys.serving.tracing`), the engine call runs in a span named after the batcher,
the child of the first live caller's span, linked to the others'. ``sizes`` (batch size
-> batches) and :meth:`MicroBatcher.queued` feed the servers' metrics.

Example::

    batcher = MicroBatcher(engine.rank_many, BatchConfig(max_batch=32, max_wait_ms=5))
    result = await batcher.submit(request)      # from many coroutines at once
    batcher.stats()                             # {"batches": ..., "mean_batch": ...}
    await batcher.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from recsys.serving import tracing
from recsys.serving.errors import NotReadyError, OverloadedError
from recsys.validation import Field, config_dataclass

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
_STOP = object()


@config_dataclass
class BatchConfig:
    """How a :class:`MicroBatcher` forms batches.

    Attributes:
        max_batch: items per engine call (1 = batching off).
        max_wait_ms: how long a batch that is not full waits for more items, ms (0 = take
            only what is already queued: no added latency, batches form under load only).
        queue_limit: queued items beyond which :meth:`MicroBatcher.submit` refuses work
            (RESOURCE_EXHAUSTED at the edge) instead of growing latency without bound.
    """

    max_batch: int = Field(32, ge=1)
    max_wait_ms: float = Field(5.0, ge=0.0, le=1000.0)
    queue_limit: int = Field(4096, ge=1)


class MicroBatcher(Generic[T, R]):
    """Batches concurrent :meth:`submit` calls into calls of ``fn``.

    Args:
        fn: ``fn(items) -> results``, one result (or an exception instance, raised to that
            caller only) per item, in order. Runs in the batcher's worker thread.
        config: :class:`BatchConfig`.
        name: for logs and the thread name.
        executor: a thread pool to run ``fn`` in (default: a private one-thread pool,
            so engine calls never overlap).
        inline: run ``fn`` on the event loop's thread instead (no thread hand-off; for
            engines whose batch takes well under a millisecond, where the hand-off and
            the GIL ping-pong cost more than they save; the loop waits meanwhile).
    """

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R | BaseException]],
        config: BatchConfig | None = None,
        *,
        name: str = "batcher",
        executor: ThreadPoolExecutor | None = None,
        inline: bool = False,
    ) -> None:
        self.fn = fn
        self.config = config or BatchConfig()
        self.name = name
        self.inline = inline
        self._own_executor = executor is None and not inline
        self._executor = executor or (
            None if inline else ThreadPoolExecutor(1, thread_name_prefix=name)
        )
        self._queue: asyncio.Queue[Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._full: asyncio.Event | None = None  # set when a waiting batch could be filled
        self._need = 0  # items the batch being collected still wants (0 = not waiting)
        self._closed = False
        self.batches = 0
        self.items = 0
        self.dropped = 0
        self.busy_s = 0.0
        self.sizes: dict[int, int] = {}  # batch size -> count

    def _ensure_started(self) -> asyncio.Queue[Any]:
        if self._closed:
            raise NotReadyError(f"{self.name} is shutting down")
        if self._task is None:
            self._queue = asyncio.Queue()
            self._full = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)
        assert self._queue is not None
        return self._queue

    async def submit(self, item: T) -> R:
        """Queue ``item``; returns its result once its batch ran (or raises its error)."""
        queue = self._ensure_started()
        if queue.qsize() >= self.config.queue_limit:
            raise OverloadedError(
                f"{self.name}: {queue.qsize()} requests queued (limit {self.config.queue_limit}); "
                "retry with backoff"
            )
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        queue.put_nowait((item, fut, tracing.current_context()))
        if self._need and queue.qsize() >= self._need:
            assert self._full is not None
            self._full.set()
        return await fut

    def _drain(self, queue: asyncio.Queue[Any], batch: list[Any]) -> bool:
        """Move queued items into ``batch`` (up to max_batch); False if the stop sentinel came."""
        while len(batch) < self.config.max_batch:
            try:
                entry = queue.get_nowait()
            except asyncio.QueueEmpty:
                return True
            if entry is _STOP:
                queue.put_nowait(_STOP)  # finish this batch, stop on the next loop
                return False
            batch.append(entry)
        return True

    async def _collect(self, queue: asyncio.Queue[Any], first: Any) -> list[Any]:
        """One batch: what is queued, then (if not full) what arrives within the wait budget.

        One timer per batch, not per item: the collector sleeps on an event that
        :meth:`submit` sets as soon as the queue could fill the batch.
        """
        batch = [first]
        if not self._drain(queue, batch):
            return batch
        wait = self.config.max_wait_ms / 1000.0
        if wait > 0 and len(batch) < self.config.max_batch:
            assert self._full is not None
            self._full.clear()
            self._need = self.config.max_batch - len(batch)
            try:
                await asyncio.wait_for(self._full.wait(), wait)
            except TimeoutError:
                pass
            finally:
                self._need = 0
            self._drain(queue, batch)
        return batch

    async def _run(self) -> None:
        assert self._queue is not None
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            first = await queue.get()
            if first is _STOP:
                return
            batch = await self._collect(queue, first)
            live = [(item, fut) for item, fut, _ in batch if not fut.done()]
            contexts = [ctx for _, fut, ctx in batch if not fut.done()]
            traced = any(c is not None for c in contexts)
            fn = tracing.traced(self.fn, self.name, contexts) if traced else self.fn
            self.dropped += len(batch) - len(live)
            if not live:
                continue
            t0 = time.perf_counter()
            try:
                items = [item for item, _ in live]
                if self.inline:
                    results = fn(items)
                else:
                    results = await loop.run_in_executor(self._executor, fn, items)
                if len(results) != len(live):
                    raise RuntimeError(
                        f"{self.name}: engine returned {len(results)} results for {len(live)} items"
                    )
            except Exception as exc:  # the whole call failed: every caller gets the error
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            finally:
                self.busy_s += time.perf_counter() - t0
                self.batches += 1
                self.items += len(live)
                self.sizes[len(live)] = self.sizes.get(len(live), 0) + 1
            for (_, fut), res in zip(live, results, strict=True):
                if fut.done():
                    continue
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)

    def queued(self) -> int:
        """Items waiting for a batch now (for the metrics)."""
        return self._queue.qsize() if self._queue is not None else 0

    def stats(self) -> dict[str, Any]:
        """Batches run, items served, mean batch size, engine busy time, dropped items."""
        return {
            "batches": self.batches,
            "items": self.items,
            "mean_batch": self.items / self.batches if self.batches else 0.0,
            "max_batch_seen": max(self.sizes) if self.sizes else 0,
            "busy_s": self.busy_s,
            "dropped": self.dropped,
            "max_batch": self.config.max_batch,
            "max_wait_ms": self.config.max_wait_ms,
        }

    async def close(self) -> None:
        """Finish the queued work, stop the worker task and the private thread pool."""
        self._closed = True
        if self._task is not None and self._queue is not None:
            self._queue.put_nowait(_STOP)
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._own_executor and self._executor is not None:
            self._executor.shutdown(wait=True)
