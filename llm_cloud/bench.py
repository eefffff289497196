"""Benchmark of the codebook LM: generative retrieval quality and serving throughput.

Shapes: U test users, N top-N, I items.

**Quality** (:func:`quality_rows`): leave-one-out by time (each user's last event is
the test target; the history is everything before it, truncated to ``max_history``).
The LM generates its top-N IDs per user by constrained beam search; Recall@K = 1 if the
target is among the first K generated items, NDCG@K = 1/log2(rank+1) then (one
relevant item, so Recall@K equals HR@K). Beside it: the most-popular baseline computed
here (counts over every non-test event, ties pessimistic), each with and without the
user's already-seen items, and TIGER's published Amazon Beauty figures as an anchor
(different dataset: read as scale, not as a head-to-head comparison).

**Throughput** (:func:`throughput_rows`): the same model and the same histories through
each backend: start-up time, then batches of ``batch_users`` users timed one call each
(p50/p99 latency per call, users/s overall), plus how often each backend's top-1 agrees
with the transformers backend's.

Example::

    evaluation = loo_histories(ds)                   # histories + targets of test users
    ranked = backend.generate(evaluation.histories, top_n=10)
    quality_metrics(ranked, evaluation.targets)      # {'recall@5': ..., 'ndcg@10': ...}
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from recsys.metrics import hit_rate_at_k, ndcg_at_k, target_ranks

logger = logging.getLogger(__name__)

KS = (5, 10)
# TIGER (Rajput et al., "Recommender Systems with Generative Retrieval", NeurIPS 2023),
# Table 2, Amazon Beauty, leave-one-out: the published anchor quoted beside our figures.
TIGER_BEAUTY = {"recall@10": 0.0648, "ndcg@10": 0.0384}


@dataclass
class LooEvaluation:
    """Test users of leave-one-out by time.

    Attributes:
        users: user indices [U].
        histories: each user's events before the test event (item indices, time order).
        targets: the test item per user [U].
        train_rows: rows of every non-test event (the popularity counts' basis).
    """

    users: np.ndarray
    histories: list[list[int]]
    targets: np.ndarray
    train_rows: np.ndarray


def loo_histories(ds: Any, max_users: int | None = None) -> LooEvaluation:
    """Leave-one-out test histories (train + validation events) and targets of a dataset."""
    from recsys.data.splits import leave_one_out, user_sequences

    loo = leave_one_out(ds)
    rows = np.sort(np.concatenate([loo.train, loo.valid]))
    seqs = user_sequences(ds, rows)
    users = loo.users if max_users is None else loo.users[:max_users]
    test = loo.test if max_users is None else loo.test[:max_users]
    return LooEvaluation(
        users=users,
        histories=[seqs[u].tolist() for u in users.tolist()],
        targets=ds.item_index[test].astype(np.int64),
        train_rows=rows,
    )


def ranks_from_lists(
    ranked: Sequence[Sequence[tuple[int, float]]], targets: np.ndarray
) -> torch.Tensor:
    """1-based rank of each target in its generated list; len(list)+large if absent. [U]"""
    miss = 10**9
    out = []
    for items, target in zip(ranked, targets.tolist(), strict=True):
        order = [i for i, _ in items]
        out.append(order.index(target) + 1 if target in order else miss)
    return torch.tensor(out, dtype=torch.int64)


def metrics_from_ranks(ranks: torch.Tensor, ks: Sequence[int] = KS) -> dict[str, float]:
    """Mean Recall@K (= HR@K, one target) and NDCG@K."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = float(hit_rate_at_k(ranks, k).mean())
        out[f"ndcg@{k}"] = float(ndcg_at_k(ranks, k).mean())
    return out


def quality_metrics(
    ranked: Sequence[Sequence[tuple[int, float]]], targets: np.ndarray
) -> dict[str, float]:
    """Recall@5/10 and NDCG@5/10 of generated top-N lists."""
    return metrics_from_ranks(ranks_from_lists(ranked, targets))


def popularity_metrics(ds: Any, evaluation: LooEvaluation, exclude_seen: bool) -> dict[str, float]:
    """Most-popular baseline: items ranked by their count over the non-test events."""
    counts = np.bincount(ds.item_index[evaluation.train_rows], minlength=ds.num_items)
    scores = torch.tensor(counts, dtype=torch.float64).expand(len(evaluation.users), -1)  # [U, I]
    exclude = None
    if exclude_seen:
        exclude = torch.zeros(scores.shape, dtype=torch.bool)
        for row, history in enumerate(evaluation.histories):
            exclude[row, history] = True
    ranks = target_ranks(scores, torch.from_numpy(evaluation.targets), exclude)
    return metrics_from_ranks(ranks)


def timed_batches(
    generate: Callable[[list[list[int]], int], Any],
    histories: list[list[int]],
    batch_users: int,
    top_n: int,
) -> tuple[list[Any], list[float]]:
    """Run ``generate`` over ``histories`` in batches; (results per user, seconds per call)."""
    results: list[Any] = []
    seconds: list[float] = []
    for start in range(0, len(histories), batch_users):
        batch = histories[start : start + batch_users]
        t0 = time.perf_counter()
        results.extend(generate(batch, top_n))
        seconds.append(time.perf_counter() - t0)
    return results, seconds


def latency_summary(seconds: Sequence[float], users: int) -> dict[str, float]:
    """users/s over all calls, p50/p99 of per-call latency (ms)."""
    arr = np.asarray(seconds, dtype=np.float64)
    total = float(arr.sum())
    return {
        "users_per_s": users / total if total > 0 else math.nan,
        "p50_ms": float(np.percentile(arr, 50) * 1e3) if len(arr) else math.nan,
        "p99_ms": float(np.percentile(arr, 99) * 1e3) if len(arr) else math.nan,
        "calls": len(arr),
        "total_s": total,
    }


def top1_agreement(
    a: Sequence[Sequence[tuple[int, float]]], b: Sequence[Sequence[tuple[int, float]]]
) -> float:
    """Share of users whose first item is the same in both result lists."""
    same = [bool(x) and bool(y) and x[0][0] == y[0][0] for x, y in zip(a, b, strict=True)]
    return float(np.mean(same)) if same else math.nan
