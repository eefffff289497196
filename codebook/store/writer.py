"""Write-behind for the prototype store: :class:`StoreWriter`.

A serving path that must answer within a deadline hands its store writes to a writer
thread instead of writing them itself. The writer owns its own store (its own engine and
connections), takes the queued operations in order and writes them:

* **batched** operations (``apply(session)``: a device assignment, the edit-log rows of
  an engine call) run together, up to ``max_batch`` of them in ONE transaction;
* **alone** operations (``run(store)``: a prototype refinement or spawn, each a store use
  case with its own transaction and its own lost-update-free locking) run one at a time,
  in queue order (the batch before them is committed first).

**Retries**: a transaction that fails with a transient error (SQLite busy/locked,
PostgreSQL serialization failure, deadlock, lock timeout, dropped connection:
:func:`codebook.store.service.is_transient`) is retried with jittered exponential
back-off (tenacity, ``max_attempts`` tries, at most ``max_backoff_s`` apart: with the
defaults a write is given up after about 7 s of back-off on average (5 to 14 s), plus
the tries themselves: 20 x 0.25 s of SQLite busy waits on a locked file). A batch that fails with a non-transient error
is split and each operation tried alone, so one bad row does not take its neighbours
down; what still fails (or outlasts the retries) is counted in ``failed`` and logged.
Nothing is raised to the caller: the request that made the write was answered already.

**A full queue** (``queue_size`` operations waiting: the database is stalled or down):
:meth:`submit` blocks at most ``full_wait_s`` for room, then drops the operation and
counts it in ``dropped``; after one such drop it does not block again until the queue has
drained to half, so an outage costs the serving path at most one ``full_wait_s`` stall,
not one per write.

**Shutdown**: :meth:`close` writes everything queued (with retries) before it returns;
:meth:`flush` waits until what was queued so far is written.

**Metrics and traces**: :attr:`StoreWriter.write_seconds` (a Prometheus histogram, not
registered anywhere: the cloud server's metrics collect it, ``llm_cloud.service.metrics``)
times each transaction with its retries; each op keeps its submitter's trace context
(:mod:`recsys.serving.tracing`), so a transaction's ``store.write`` span continues the
trace of its first op and links the others.

Example::

    writer = StoreWriter.open(store.engine.url)
    writer.submit(WriteOp("log", apply=lambda session: EditLogRepository(session).add(...)))
    writer.flush(); writer.stats()        # {"queued": 0, "written": 1, ...}
    writer.close()
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import Histogram
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session
from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from codebook.store.service import PrototypeStore, is_transient
from recsys.serving import tracing
from recsys.validation import Field, config_dataclass

logger = logging.getLogger(__name__)

_STOP = object()


@config_dataclass
class WriterConfig:
    """How a :class:`StoreWriter` queues, batches and retries.

    Attributes:
        queue_size: operations waiting at most (then :meth:`StoreWriter.submit` drops).
        full_wait_s: how long a submit waits for room in a full queue before dropping.
        max_batch: batched operations per transaction.
        max_attempts: tries of one transaction on transient errors.
        max_backoff_s: longest sleep between two tries (jittered exponential from 10 ms).
        report_every_s: how often the counters are logged while they change (INFO; WARNING
            when writes were dropped or failed since the last report).
    """

    queue_size: int = Field(10_000, ge=1)
    full_wait_s: float = Field(0.02, ge=0.0, le=10.0)
    max_batch: int = Field(256, ge=1)
    max_attempts: int = Field(20, ge=1)
    max_backoff_s: float = Field(1.0, ge=0.0)
    report_every_s: float = Field(60.0, gt=0.0)


@dataclass
class WriteOp:
    """One queued write: ``apply(session)`` (batched into the writer's transaction) or
    ``run(store)`` (alone: a use case with its own transaction); ``done(result)`` is
    called on the writer thread after it committed; ``lost(reason)`` when it was dropped
    or failed for good."""

    kind: str
    apply: Callable[[Session], Any] | None = None
    run: Callable[[PrototypeStore], Any] | None = None
    done: Callable[[Any], None] | None = None
    lost: Callable[[str], None] | None = None
    rows: int = 1  # rows it writes (for the counters)
    context: Any = None  # the submitter's trace context (recsys.serving.tracing), set by submit

    def __post_init__(self) -> None:
        if (self.apply is None) == (self.run is None):
            raise ValueError(f"write op {self.kind!r} needs exactly one of apply / run")


class StoreWriter:
    """A writer thread with its own :class:`PrototypeStore` (see the module docstring).

    Args:
        store: the writer's own store (closed by :meth:`close`).
        config: :class:`WriterConfig`.
    """

    def __init__(self, store: PrototypeStore, config: WriterConfig | None = None) -> None:
        self.store = store
        self.config = config or WriterConfig()
        self._queue: queue.Queue[Any] = queue.Queue(self.config.queue_size)
        self._shedding = False  # after a drop: no blocking until the queue drains to half
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._unfinished = 0  # submitted, not yet written or failed
        self.written = 0  # operations committed
        self.rows = 0  # rows they wrote
        self.batches = 0  # transactions committed
        self.retried = 0  # transaction retries after transient errors
        self.failed = 0  # operations given up on (logged)
        self.dropped = 0  # operations refused by a full queue
        # one transaction with its retries, s (unregistered: the server's metrics collect it)
        self.write_seconds = Histogram(
            "recsys_store_write_seconds",
            "store writer transaction time with its retries, seconds",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
            registry=None,
        )
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, url: str | URL, config: WriterConfig | None = None) -> StoreWriter:
        """A writer with its own engine on ``url`` (the schema must be current)."""
        return cls(PrototypeStore.open(url), config)

    # ---- the serving side ------------------------------------------------------------------
    def submit(self, op: WriteOp) -> bool:
        """Queue ``op``; False (and counted in ``dropped``) when the queue stayed full."""
        if self._closed:
            self._count_drop(op, "the writer is closed")
            return False
        if op.context is None:
            op.context = tracing.current_context()
        if self._shedding and self._queue.qsize() <= self.config.queue_size // 2:
            self._shedding = False
        with self._lock:
            self._unfinished += 1
        try:
            if self._shedding or self.config.full_wait_s == 0:
                self._queue.put_nowait(op)
            else:
                self._queue.put(op, timeout=self.config.full_wait_s)
        except queue.Full:
            with self._lock:
                self._unfinished -= 1
                self._idle.notify_all()
            self._shedding = True
            self._count_drop(op, f"the queue is full ({self.config.queue_size} waiting)")
            return False
        return True

    def _count_drop(self, op: WriteOp, why: str) -> None:
        _call(op.lost, why)
        with self._lock:
            self.dropped += 1
            first = self.dropped == 1 or self.dropped % 1000 == 0
        if first:
            logger.error("store writer dropped a %s write: %s (%d dropped so far)",
                         op.kind, why, self.dropped)  # fmt: skip

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every operation submitted so far is written or failed (True), or
        ``timeout`` seconds passed (False)."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._unfinished:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def stats(self) -> dict[str, Any]:
        """Queue depth and the writer's counters (the cloud's status reports them)."""
        return {
            "queued": self._queue.qsize(),
            "queue_size": self.config.queue_size,
            "written": self.written,
            "rows": self.rows,
            "batches": self.batches,
            "retried": self.retried,
            "failed": self.failed,
            "dropped": self.dropped,
        }

    def close(self, timeout: float | None = 30.0) -> None:
        """Write what is queued, stop the thread, close the writer's store."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error("store writer: %d writes still queued at shutdown", self._queue.qsize())
        logger.info("store writer closed: %s", self.stats())
        self.store.close()

    # ---- the writer thread ------------------------------------------------------------------
    def _report(self, last: dict[str, Any]) -> dict[str, Any]:
        """Log the counters if they changed since ``last``; returns them."""
        now = self.stats()
        keys = ("written", "retried", "failed", "dropped")
        if any(now[k] != last.get(k) for k in keys):
            bad = now["failed"] != last.get("failed", 0) or now["dropped"] != last.get("dropped", 0)
            logger.log(logging.WARNING if bad else logging.INFO, "store writer: %s", now)
        return now

    def _run(self) -> None:
        pending: Any = None
        last: dict[str, Any] = {"failed": 0, "dropped": 0}
        next_report = time.monotonic() + self.config.report_every_s
        while True:
            if time.monotonic() >= next_report:
                last = self._report(last)
                next_report = time.monotonic() + self.config.report_every_s
            if pending is not None:
                first, pending = pending, None
            else:
                try:
                    first = self._queue.get(timeout=max(0.0, next_report - time.monotonic()))
                except queue.Empty:
                    continue
            if first is _STOP:
                return
            if first.run is not None:
                self._write([first])
                continue
            batch = [first]
            while len(batch) < self.config.max_batch:  # the batched ops already queued
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP or nxt.run is not None:
                    pending = nxt  # after this batch, in order
                    break
                batch.append(nxt)
            self._write(batch)

    def _retrying(self, what: str) -> Retrying:
        cfg = self.config
        return Retrying(
            stop=stop_after_attempt(cfg.max_attempts),
            wait=wait_random_exponential(multiplier=0.01, max=cfg.max_backoff_s),
            retry=retry_if_exception(is_transient),
            before_sleep=lambda state: self._note_retry(what, state),
        )

    def _note_retry(self, what: str, state: RetryCallState) -> None:
        with self._lock:
            self.retried += 1
        logger.warning(
            "store writer: %s attempt %d hit a transient error (%s); retrying in %.0f ms",
            what,
            state.attempt_number,
            state.outcome.exception() if state.outcome else None,
            1000 * (state.next_action.sleep if state.next_action else 0.0),
        )

    def _write(self, ops: list[WriteOp]) -> None:
        """Write ``ops`` (one transaction, retried); on failure, each op alone."""
        what = ops[0].kind if len(ops) == 1 else f"batch of {len(ops)}"
        t0 = time.perf_counter()
        try:
            with tracing.span_from("store.write", [op.context for op in ops], ops=what):
                results = self._retrying(what)(self._transaction, ops)
        except Exception as exc:
            self.write_seconds.observe(time.perf_counter() - t0)
            err = exc.last_attempt.exception() if isinstance(exc, RetryError) else exc
            if len(ops) > 1 and not (err is not None and is_transient(err)):
                logger.warning("store writer: %s failed (%s); writing each op alone", what, err)
                for op in ops:
                    self._write([op])
                return
            with self._lock:
                self.failed += len(ops)
            logger.error("store writer: %s failed for good: %s", what, err)
            for op in ops:
                _call(op.lost, f"failed: {err}")
            self._finish(len(ops))
            return
        self.write_seconds.observe(time.perf_counter() - t0)
        with self._lock:
            self.written += len(ops)
            self.rows += sum(op.rows for op in ops)
            self.batches += 1
        for op, result in zip(ops, results, strict=True):
            _call(op.done, result)
        self._finish(len(ops))

    def _transaction(self, ops: list[WriteOp]) -> list[Any]:
        if ops[0].run is not None:
            return [ops[0].run(self.store)]
        with self.store.transaction(write=True) as session:
            return [op.apply(session) for op in ops]  # type: ignore[misc]

    def _finish(self, n: int) -> None:
        with self._lock:
            self._unfinished -= n
            self._idle.notify_all()


def _call(fn: Callable[[Any], None] | None, arg: Any) -> None:
    """A write op's callback; a bug in it is logged, never stops the writer."""
    if fn is None:
        return
    try:
        fn(arg)
    except Exception:
        logger.exception("store writer: a write callback failed")
