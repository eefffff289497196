"""``recsys bench ann``: recall and latency of the faiss pre-selection against exact
full-catalogue scoring, on synthetic catalogues of 10^4 to 10^6 items.

Queries are real: the trained ranker's head outputs [U, D] for the dataset's
leave-one-out test users, with their histories as the seen items; half of the users
(seeded) go through the head with a random rank-8 edit (factored), as edited users do. The users are split
in two (seeded): the *tuning* half chooses each index's search parameter (the smallest
nprobe / efSearch whose recall@10 reaches the target), the *held-out* half reports
recall and latency at that value.

Catalogue of N items, width D of the ranker (:func:`synthetic_catalogue`): the ranker's
own I0 items first (real vectors and biases, so the users' seen items are real), then
N - I0 items drawn from a Gaussian with the mean and covariance of the real item table;
their bias follows the real items' popularity curve (bias against log popularity rank,
a least-squares line ``a - s log(rank)``, fitted on the real biases) over a random
popularity order, plus noise of the fit's residual spread: a Zipf-like long tail.

Per catalogue size: exact scoring (``query @ table^T + bias``, seen masked, top-10),
IVF-Flat and HNSW-Flat through :func:`~device_ranker.ann.ann_topk` (candidates scored
exactly, seen excluded). Latency per user (one query per call) and per batch of 64;
index build time and size.

Example::

    figures = run_ann_bench(AnnBenchConfig(sizes=(10_000,)), ranker, test_histories)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from device_ranker.ann import AnnIndex, ann_topk, exact_topk, recall_at_k
from device_ranker.config import AnnConfig
from device_ranker.edits import random_edit
from device_ranker.ranker import Ranker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnnBenchConfig:
    """What ``recsys bench ann`` measures."""

    sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)  # catalogue sizes N
    k: int = 10
    batch: int = 64  # users per batched call
    latency_users: int = 200  # single-user calls timed per method and size
    latency_batches: int = 20  # batched calls timed per method and size
    target_recall: float = 0.99  # the search parameter is the smallest reaching it (tuning half)
    nprobes: tuple[int, ...] = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)  # IVF sweep
    ef_searches: tuple[int, ...] = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768)  # HNSW sweep
    ivf: AnnConfig = field(default_factory=lambda: AnnConfig(mode="on", kind="ivf"))
    hnsw: AnnConfig = field(default_factory=lambda: AnnConfig(mode="on", kind="hnsw"))
    edited_share: float = 0.5  # users whose query comes through a random rank-8 edit
    seed: int = 0


def synthetic_catalogue(
    table: torch.Tensor, bias: torch.Tensor, n: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Real table [I0, D], bias [I0] -> a catalogue of n >= I0 items [n, D], [n] (see the
    module docstring)."""
    i0 = table.shape[0]
    if n < i0:
        raise ValueError(f"catalogue size {n} is below the ranker's {i0} items")
    rng = np.random.default_rng(seed)
    real = table.double().numpy()
    mean, cov = real.mean(0), np.cov(real, rowvar=False)
    extra = rng.multivariate_normal(mean, cov, size=n - i0, method="cholesky")  # [n - I0, D]
    b = np.sort(bias.double().numpy())[::-1]  # most popular first
    logr = np.log(np.arange(1, i0 + 1))
    slope, intercept = np.polyfit(logr, b, 1)
    resid = float(np.std(b - (intercept + slope * logr)))
    ranks = rng.permutation(np.arange(1, n + 1))[: n - i0]  # popularity ranks of the new items
    extra_bias = intercept + slope * np.log(ranks) + rng.normal(0, resid, n - i0)
    out_t = torch.cat([table, torch.from_numpy(extra).float()])
    out_b = torch.cat([bias, torch.from_numpy(extra_bias).float()])
    return out_t, out_b


class _View:
    """An AnnIndex-shaped holder of the table and bias for :func:`exact_topk`."""

    def __init__(self, table: torch.Tensor, bias: torch.Tensor) -> None:
        self.table, self.bias = table, bias


def _exact(view: _View, q: torch.Tensor, s: list[np.ndarray], *, k: int):
    return exact_topk(view, q, s, k)


def _star(fn, args: tuple) -> Any:
    return fn(*args)


def _pct_ms(samples: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(samples) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def _time_calls(fn, calls: Sequence[Any], warmup: int = 3) -> tuple[float, float]:
    for c in calls[:warmup]:
        fn(c)
    ts = []
    for c in calls:
        t0 = time.perf_counter()
        fn(c)
        ts.append(time.perf_counter() - t0)
    return _pct_ms(ts)


def _topk_all(fn, queries: torch.Tensor, seen: list[np.ndarray], batch: int) -> np.ndarray:
    """fn(q [b, D], seen b-list) -> items [b, K]; over all rows in batches -> [U, K]."""
    out = [
        fn(queries[s : s + batch], seen[s : s + batch])[0].numpy()
        for s in range(0, len(seen), batch)
    ]
    return np.concatenate(out)


def run_ann_bench(
    cfg: AnnBenchConfig, ranker: Ranker, histories: Sequence[Sequence[int]], progress=None
) -> dict[str, Any]:
    """Measure exact vs IVF vs HNSW at every size; a dict of figures (rows + sweeps)."""
    rng = np.random.default_rng(cfg.seed)
    queries = ranker.queries(histories, edit="base").clone()  # [U, D]
    gen = torch.Generator().manual_seed(cfg.seed)
    edited = np.flatnonzero(rng.random(len(histories)) < cfg.edited_share)
    if len(edited):  # these users' queries come through an edited (factored) head
        edit = ranker.prepare(random_edit(ranker.model.head, rank=8, scale=0.002, generator=gen))
        queries[edited] = ranker.queries([histories[i] for i in edited], edit=edit)
    seen = [np.asarray(h, dtype=np.int64) for h in histories]
    order = rng.permutation(len(seen))
    tune, held = np.sort(order[::2]), np.sort(order[1::2])
    q_t, s_t = queries[tune], [seen[i] for i in tune]
    q_h, s_h = queries[held], [seen[i] for i in held]
    lat_users = held[: cfg.latency_users]
    batches = [rng.choice(len(held), cfg.batch, replace=False) for _ in range(cfg.latency_batches)]
    bias = ranker.model.item_bias.detach()
    rows: list[dict[str, Any]] = []
    sweeps: dict[str, Any] = {}
    for n in cfg.sizes:
        t0 = time.perf_counter()
        table, b = synthetic_catalogue(ranker.model.item_table.detach(), bias, n, cfg.seed)
        exact = partial(_exact, _View(table, b), k=cfg.k)
        truth_t = _topk_all(exact, q_t, s_t, cfg.batch)  # [U_t, K]
        truth_h = _topk_all(exact, q_h, s_h, cfg.batch)  # [U_h, K]
        logger.info("N=%d: catalogue + exact top-k in %.1f s", n, time.perf_counter() - t0)
        single = [(queries[i : i + 1], [seen[i]]) for i in lat_users]
        batched = [(q_h[idx], [s_h[j] for j in idx]) for idx in batches]
        p50, p99 = _time_calls(partial(_star, exact), single)
        bp50, bp99 = _time_calls(partial(_star, exact), batched)
        rows.append(
            {
                "items": n,
                "method": "exact",
                "param": "",
                "recall@10": 1.0,
                "user_p50_ms": p50,
                "user_p99_ms": p99,
                "batch_p50_ms": bp50,
                "batch_p99_ms": bp99,
                "build_s": 0.0,
                "index_mb": (table.numel() + b.numel()) * 4 / 2**20,
                "2nd_search_%": "",
                "exact_%": "",
            }
        )
        for name, base, grid in (
            ("ivf", cfg.ivf, cfg.nprobes),
            ("hnsw", cfg.hnsw, cfg.ef_searches),
        ):
            index = AnnIndex(table, b, base)
            sweep = []
            for v in grid:
                index.set_search_param(v)
                approx = _topk_all(
                    lambda q, s, ix=index: ann_topk(ix, q, s, cfg.k), q_t, s_t, cfg.batch
                )
                sweep.append({"param": v, "tuning_recall@10": recall_at_k(approx, truth_t)})
                logger.info(
                    "N=%d %s %d: tuning recall %.4f", n, name, v, sweep[-1]["tuning_recall@10"]
                )
                if sweep[-1]["tuning_recall@10"] >= cfg.target_recall:
                    break
            chosen = sweep[-1]["param"]
            index.set_search_param(chosen)
            approx_h = _topk_all(
                lambda q, s, ix=index: ann_topk(ix, q, s, cfg.k), q_h, s_h, cfg.batch
            )
            run = lambda a, ix=index: ann_topk(ix, a[0], a[1], cfg.k)  # noqa: E731
            index.stats = dict.fromkeys(index.stats, 0)
            p50, p99 = _time_calls(run, single)
            bp50, bp99 = _time_calls(run, batched)
            st = index.stats
            label = (
                f"nlist={index.nlist} nprobe={chosen}"
                if name == "ivf"
                else f"M={base.hnsw_m} efC={base.ef_construction} efS={chosen}"
            )
            rows.append(
                {
                    "items": n,
                    "method": name,
                    "param": label,
                    "recall@10": recall_at_k(approx_h, truth_h),
                    "user_p50_ms": p50,
                    "user_p99_ms": p99,
                    "batch_p50_ms": bp50,
                    "batch_p99_ms": bp99,
                    "build_s": index.build_seconds,
                    "index_mb": index.nbytes / 2**20,
                    "2nd_search_%": 100 * st["second_search"] / max(st["rows"], 1),
                    "exact_%": 100 * st["exact"] / max(st["rows"], 1),
                }
            )
            sweeps[f"{name}@{n}"] = sweep
            del index
        if progress is not None:
            progress(rows[-3:])
    return {
        "config": asdict(cfg) | {"ivf": asdict(cfg.ivf), "hnsw": asdict(cfg.hnsw)},
        "users": {"tuning": len(tune), "held_out": len(held), "edited": len(edited)},
        "rows": rows,
        "sweeps": sweeps,
        "torch_threads": torch.get_num_threads(),
    }
