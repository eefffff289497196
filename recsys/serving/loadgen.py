"""A small asyncio load generator for gRPC benchmarks: bounded concurrency and duration.

Two ways to drive a call:

* **closed loop** (``rate=None``): ``concurrency`` workers each call, wait for the
  answer, call again, for ``duration_s``: the highest throughput the server sustains at
  that concurrency. By Little's law its mean latency is ``concurrency / throughput``.
* **open loop** (``rate=R``): calls are *scheduled* at R per second whatever the answers
  do, with at most ``concurrency`` in flight; a call that waits for a free slot counts
  that wait in its latency (latency = answer time - scheduled time), so a server that
  falls behind shows it instead of silently lowering the offered load ("coordinated
  omission").

Calls started during the first ``warmup_s`` seconds are not counted. Errors are counted
by status code name and excluded from the latency figures.

Example::

    result = await run_load(lambda n: stub.Recommend(req(n), timeout=1.0),
                            concurrency=32, duration_s=10, rate=1000)
    result.summary()     # {"requests": ..., "throughput_rps": ..., "p99_ms": ..., ...}
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import numpy as np

from recsys.errors import ValidationError

logger = logging.getLogger(__name__)


@dataclass
class LoadResult:
    """Latencies (ms) of the counted calls and the error counts."""

    mode: str
    concurrency: int
    duration_s: float
    offered_rps: float | None
    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_ms, dtype=np.float64)
        pct = np.percentile(lat, [50, 95, 99]) if len(lat) else [float("nan")] * 3
        return {
            "mode": self.mode,
            "concurrency": self.concurrency,
            "offered_rps": self.offered_rps,
            "requests": len(lat),
            "errors": sum(self.errors.values()),
            "error_codes": dict(self.errors),
            "seconds": self.duration_s,
            "throughput_rps": len(lat) / self.duration_s if self.duration_s else 0.0,
            "p50_ms": float(pct[0]),
            "p95_ms": float(pct[1]),
            "p99_ms": float(pct[2]),
            "mean_ms": float(lat.mean()) if len(lat) else float("nan"),
            "max_ms": float(lat.max()) if len(lat) else float("nan"),
            **self.extra,
        }


async def run_load(
    call: Callable[[int], Awaitable[Any]],
    *,
    concurrency: int,
    duration_s: float,
    rate: float | None = None,
    warmup_s: float = 1.0,
    on_result: Callable[[Any], None] | None = None,
    on_call: Callable[[float | None, str | None], None] | None = None,
) -> LoadResult:
    """Drive ``call(n)`` (n = 0, 1, ...) as described in the module docstring.

    Args:
        call: an async function issuing one request.
        concurrency: calls in flight at most (>= 1).
        duration_s: measured seconds (after the warm-up).
        rate: calls per second (open loop) or None (closed loop).
        warmup_s: seconds of calls not counted, before the measured window.
        on_result: called with every successful counted result (e.g. to read a field).
        on_call: called when each counted call ends, with (latency ms, None) or, for an
            error, (None, its status code name): e.g. to bin the calls over time.
    """
    if concurrency < 1 or duration_s <= 0 or warmup_s < 0:
        raise ValidationError("concurrency >= 1, duration_s > 0 and warmup_s >= 0 required")
    if rate is not None and rate <= 0:
        raise ValidationError(f"rate must be > 0, got {rate}")
    result = LoadResult(
        mode="open-loop" if rate else "closed-loop",
        concurrency=concurrency,
        duration_s=duration_s,
        offered_rps=rate,
    )
    counter = itertools.count()
    start = time.perf_counter()
    measure_from = start + warmup_s
    end = measure_from + duration_s

    async def one(scheduled: float) -> None:
        n = next(counter)
        try:
            value = await call(n)
        except grpc.aio.AioRpcError as exc:
            if scheduled >= measure_from:
                name = exc.code().name
                result.errors[name] = result.errors.get(name, 0) + 1
                if on_call is not None:
                    on_call(None, name)
            return
        done = time.perf_counter()
        if scheduled >= measure_from and scheduled < end:
            result.latencies_ms.append((done - scheduled) * 1000.0)
            if on_result is not None:
                on_result(value)
            if on_call is not None:
                on_call(result.latencies_ms[-1], None)

    if rate is None:

        async def worker() -> None:
            while True:
                t = time.perf_counter()
                if t >= end:
                    return
                await one(t)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return result

    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()

    async def slot_call(scheduled: float) -> None:
        try:
            await one(scheduled)
        finally:
            slots.release()

    interval = 1.0 / rate
    n = 0
    while True:
        scheduled = start + n * interval
        if scheduled >= end:
            break
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await slots.acquire()  # waiting here is part of the call's latency
        task = asyncio.get_running_loop().create_task(slot_call(scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        n += 1
    if tasks:
        await asyncio.gather(*tasks)
    return result
