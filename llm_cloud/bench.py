"""Benchmark of the codebook LM: generative retrieval quality and serving throughput.

Shapes: U test users, N top-N, I items.

**Quality** (:func:`quality_metrics`): leave-one-out by time (each user's last event is
the test target; the history is everything before it, truncated to ``max_history``).
The LM generates its top-N IDs per user by constrained beam search; Recall@K = 1 if the
target is among the first K generated items, NDCG@K = 1/log2(rank+1) then (one
relevant item, so Recall@K equals HR@K). Beside it: the most-popular baseline computed
here (counts over every non-test event, ties pessimistic), each with and without the
user's already-seen items, and TIGER's published Amazon Beauty figures as an anchor
(different dataset: read as scale, not as a head-to-head comparison).

Several models are compared on the same test users; :func:`sample_users` draws at most
N of them by a seed (the draw depends only on the number of test users, N and the seed,
so every model, and every run with the same arguments, gets the same users).

**Throughput**: the same model and the same histories through each backend: start-up
time, then batches of ``batch_users`` users timed one call each (p50/p99 latency per
call, users/s overall), plus how often each backend's top-1 agrees with the transformers
backend's; :func:`users_per_s_ratio` gives vLLM / transformers, :func:`profile_steps`
splits a vLLM run into engine time, pipe time and prefix-cache hits.

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


def subset(evaluation: LooEvaluation, rows: Sequence[int]) -> LooEvaluation:
    """The test users at positions ``rows`` of ``evaluation`` (same popularity basis)."""
    keep = np.asarray(rows, dtype=np.int64)
    return LooEvaluation(
        users=evaluation.users[keep],
        histories=[evaluation.histories[r] for r in keep.tolist()],
        targets=evaluation.targets[keep],
        train_rows=evaluation.train_rows,
    )


def sample_users(
    evaluation: LooEvaluation, max_users: int | None, seed: int = 0
) -> tuple[LooEvaluation, np.ndarray | None]:
    """At most ``max_users`` test users drawn without replacement by ``seed`` (kept in
    their original order), and their positions; (evaluation, None) when it has no more.

    The draw depends only on (number of test users, ``max_users``, ``seed``), so every
    model benchmarked in one run (or in two runs with the same arguments) gets the same
    users."""
    total = len(evaluation.users)
    if max_users is None or max_users >= total:
        return evaluation, None
    if max_users < 1:
        raise ValueError(f"max_users must be >= 1, got {max_users}")
    rows = np.sort(np.random.default_rng(seed).choice(total, size=max_users, replace=False))
    return subset(evaluation, rows), rows


def users_per_s_ratio(
    figures: dict[str, Any], over: str = "vllm", under: str = "transformers"
) -> float:
    """users/s of backend ``over`` divided by that of ``under`` (batched runs); NaN if
    either is missing."""
    try:
        return figures[over]["batched"]["users_per_s"] / figures[under]["batched"]["users_per_s"]
    except (KeyError, ZeroDivisionError, TypeError):
        return math.nan


def profile_steps(
    stats: Sequence[dict[str, float]], total_s: float | None = None
) -> dict[str, float]:
    """Summary of a vLLM backend's engine calls (``VllmBackend.step_stats`` entries).

    ``engine_s`` is the time inside ``llm.generate`` (scheduling, forward passes, the trie
    logits processor, sampling and log-probs), ``call_s`` adds the JSON pipe and the
    worker's request/answer conversion; ``total_s`` (the timed generate calls) adds the
    beam search in this process. ``computed_tokens_per_prompt`` are the prompt tokens not
    served by the prefix cache, i.e. recomputed for every (user, beam) request.
    """
    calls = len(stats)
    prompts = sum(s["prompts"] for s in stats)
    engine = sum(s["engine_s"] for s in stats)
    call = sum(s["call_s"] for s in stats)
    tokens = sum(s["prompt_tokens"] for s in stats)
    cached = sum(s["cached_tokens"] for s in stats)
    computed = tokens - cached
    out = {
        "engine_calls": calls,
        "prompts_per_call": prompts / calls if calls else math.nan,
        "engine_s": engine,
        "pipe_and_worker_s": call - engine,
        "prompt_tokens_per_prompt": tokens / prompts if prompts else math.nan,
        "computed_tokens_per_prompt": computed / prompts if prompts else math.nan,
        "prefix_cache_hit_share": cached / tokens if tokens else math.nan,
        "engine_ms_per_call": 1e3 * engine / calls if calls else math.nan,
        "engine_ms_per_prompt": 1e3 * engine / prompts if prompts else math.nan,
        "engine_us_per_computed_token": 1e6 * engine / computed if computed else math.nan,
    }
    if total_s is not None:
        out["total_s"] = total_s
        out["search_in_client_s"] = total_s - call
        out["engine_share"] = engine / total_s if total_s else math.nan
    return out
