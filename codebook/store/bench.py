"""Concurrent refinement benchmark: N writers (threads or processes) each refine the same
prototype K times with an increment update; checks that no update was lost.

The update adds 1 to ``code[0]`` (a counter) and to ``member_count``, so after the run
``code[0] == versions - 1 == N * K`` exactly when every refinement was applied once.

Example::

    r = run_refine_benchmark("sqlite:////tmp/b.sqlite", writers=8, per_writer=10)
    r.counter, r.expected, r.refinements_per_s        # 80, 80, ...
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from sqlalchemy.engine import URL

from codebook.store.db import make_engine, parse_url
from codebook.store.records import PrototypeState, VersionContent
from codebook.store.service import PrototypeStore, RefineStrategy
from recsys.errors import ValidationError

logger = logging.getLogger(__name__)

Mode = Literal["threads", "processes"]


def increment_update(state: PrototypeState) -> VersionContent:
    """The benchmark's refine step: ``code[0] += 1``, ``member_count += 1``."""
    code = state.code.copy()  # [C]
    code[0] += 1
    return VersionContent(code=code, member_count=state.member_count + 1)


@dataclass(frozen=True)
class RefineBenchResult:
    backend: str
    prototype_id: int
    mode: str
    strategy: str
    writers: int
    per_writer: int
    seconds: float
    refinements_per_s: float
    expected: int  # writers * per_writer
    counter: int  # code[0] of the final version
    final_version: int
    versions: int  # rows stored (version 1 + one per refinement)
    retries: int  # transactions retried because of concurrent writers

    @property
    def lost_updates(self) -> int:
        return self.expected - self.counter

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "lost_updates": self.lost_updates}


def _refine_many(store: PrototypeStore, prototype_id: int, times: int) -> None:
    for _ in range(times):
        store.refine_prototype(prototype_id, increment_update)


def _process_worker(
    url: str, prototype_id: int, times: int, strategy: str, barrier: Any, results: Any
) -> None:
    """Body of one writer process: its own engine, wait for the others, refine, report
    ``("ok", retries)`` or ``("error", message)`` on ``results``."""
    try:
        store = PrototypeStore(make_engine(url), refine_strategy=strategy)  # type: ignore[arg-type]
        try:
            store.get_prototype(prototype_id)  # connect before the clock starts
            barrier.wait()
            _refine_many(store, prototype_id, times)
            results.put(("ok", store.retries))
        finally:
            store.close()
    except BaseException as exc:
        results.put(("error", f"{type(exc).__name__}: {exc}"))
        raise


def run_refine_benchmark(
    url: str | URL,
    *,
    writers: int = 8,
    per_writer: int = 10,
    mode: Mode = "threads",
    strategy: RefineStrategy = "lock",
    code_dim: int = 64,
) -> RefineBenchResult:
    """Create a fresh prototype on ``url`` (migrating the schema if needed), let
    ``writers`` threads or processes refine it ``per_writer`` times each, and report
    throughput and whether every refinement landed."""
    if writers < 1 or per_writer < 1:
        raise ValidationError(f"writers and per_writer must be >= 1, got {writers}, {per_writer}")
    if mode not in ("threads", "processes"):
        raise ValidationError(f"mode must be 'threads' or 'processes', got {mode!r}")
    parsed = parse_url(url)
    rendered = parsed.render_as_string(hide_password=False)
    store = PrototypeStore.open(parsed, upgrade=True, refine_strategy=strategy)
    try:
        proto = store.create_prototype(
            f"bench-{uuid.uuid4().hex[:12]}", VersionContent(code=np.zeros(code_dim, np.float64))
        )
        pid = proto.prototype_id
        if mode == "threads":
            seconds, retries = _run_threads(store, pid, writers, per_writer)
        else:
            store.engine.dispose()  # no pooled connection may be inherited by a forked child
            seconds, retries = _run_processes(rendered, pid, writers, per_writer, strategy)
        final = store.get_prototype(pid)
        versions = store.count_versions(pid)
    finally:
        store.close()
    total = writers * per_writer
    result = RefineBenchResult(
        backend=parsed.get_backend_name(),
        prototype_id=pid,
        mode=mode,
        strategy=strategy,
        writers=writers,
        per_writer=per_writer,
        seconds=seconds,
        refinements_per_s=total / seconds if seconds > 0 else float("inf"),
        expected=total,
        counter=int(final.code[0]),
        final_version=final.version,
        versions=versions,
        retries=retries,
    )
    logger.info("refine benchmark: %s", result.as_dict())
    return result


def _run_threads(
    store: PrototypeStore, prototype_id: int, writers: int, per_writer: int
) -> tuple[float, int]:
    barrier = threading.Barrier(writers + 1)
    errors: list[BaseException] = []

    def body() -> None:
        try:
            barrier.wait()
            _refine_many(store, prototype_id, per_writer)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, name=f"refine-{i}") for i in range(writers)]
    for t in threads:
        t.start()
    before = store.retries
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    return seconds, store.retries - before


def _run_processes(
    url: str, prototype_id: int, writers: int, per_writer: int, strategy: str
) -> tuple[float, int]:
    # fork where there is one (children start in milliseconds instead of re-importing
    # everything; the parent's pool was disposed, so they inherit no connection); each
    # child opens its own engine either way
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    barrier = ctx.Barrier(writers + 1)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_process_worker,
            args=(url, prototype_id, per_writer, strategy, barrier, results),
            name=f"refine-{i}",
        )
        for i in range(writers)
    ]
    for p in procs:
        p.start()
    try:
        barrier.wait(timeout=120)
    except threading.BrokenBarrierError:
        for p in procs:
            p.terminate()
        raise RuntimeError("writer processes did not start; see their error output") from None
    start = time.perf_counter()
    outcomes = [results.get(timeout=300) for _ in procs]
    seconds = time.perf_counter() - start
    for p in procs:
        p.join(timeout=60)
    failures = [msg for status, msg in outcomes if status != "ok"]
    if failures:
        raise RuntimeError(f"{len(failures)} writer process(es) failed: {failures[0]}")
    return seconds, sum(int(n) for _, n in outcomes)
