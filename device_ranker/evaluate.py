"""Full-catalogue evaluation of next-item rankers (and the popularity baseline).

Protocol: every user in the evaluation set has a history (item indices, time order) and
one target item. All I items are scored, items in the user's history are **excluded**
(ml-100k users rate a movie once, so the target is never among them), and HR/NDCG/MRR@K
follow from the target's rank (:mod:`recsys.metrics.ranking`, pessimistic ties).

Example::

    split = leave_one_out(ds)
    ev = loo_eval_set(ds, split, "test")          # histories = train + valid events
    metrics = evaluate(lambda hs: model_scores(hs), ev)   # {"hr@10": ..., "ndcg@10": ...}
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from device_ranker.features import seen_mask
from recsys.data import Dataset, LeaveOneOutSplit, user_sequences
from recsys.errors import ValidationError
from recsys.metrics import hit_rate_at_k, mrr_at_k, ndcg_at_k, target_ranks

logger = logging.getLogger(__name__)

DEFAULT_KS = (10, 20)
ScoreFn = Callable[[Sequence[np.ndarray]], torch.Tensor]  # B histories -> [B, I] scores


@dataclass(frozen=True)
class EvalSet:
    """Users to evaluate: ``histories`` (U arrays, time order), ``targets`` [U], ``users`` [U]."""

    histories: list[np.ndarray]
    targets: np.ndarray
    users: np.ndarray

    def __post_init__(self) -> None:  # arrays as data, not a config: a hand-written check
        if len(self.histories) != len(self.targets) or len(self.targets) != len(self.users):
            raise ValidationError(
                f"histories, targets, users disagree: {len(self.histories)}, {len(self.targets)}, "
                f"{len(self.users)}"
            )


def loo_eval_set(ds: Dataset, split: LeaveOneOutSplit, which: str) -> EvalSet:
    """Leave-one-out evaluation users: ``valid`` (history = train rows) or ``test``
    (history = train rows + the valid event)."""
    if which not in ("valid", "test"):
        raise ValidationError(f"which must be 'valid' or 'test', got {which!r}")
    rows = split.train if which == "valid" else np.concatenate([split.train, split.valid])
    seqs = user_sequences(ds, rows)
    target_rows = split.valid if which == "valid" else split.test
    users = ds.user_index[target_rows]
    return EvalSet([seqs[u] for u in users], ds.item_index[target_rows], users)


def metrics_from_ranks(ranks: torch.Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Mean ``hr@K``, ``ndcg@K``, ``mrr@K`` over users for each K."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"hr@{k}"] = float(hit_rate_at_k(ranks, k).mean())
        out[f"ndcg@{k}"] = float(ndcg_at_k(ranks, k).mean())
        out[f"mrr@{k}"] = float(mrr_at_k(ranks, k).mean())
    return out


def evaluate(
    score_fn: ScoreFn, ev: EvalSet, *, ks: Sequence[int] = DEFAULT_KS, batch_size: int = 512
) -> dict[str, float]:
    """Rank the full catalogue for every user (seen items excluded) and average metrics."""
    ranks = []
    with torch.inference_mode():
        for start in range(0, len(ev.targets), batch_size):
            hs = ev.histories[start : start + batch_size]
            scores = score_fn(hs)  # [B, I]
            exclude = seen_mask(hs, scores.shape[1])
            tg = torch.from_numpy(
                np.asarray(ev.targets[start : start + batch_size], dtype=np.int64)
            )
            ranks.append(target_ranks(scores, tg, exclude))
    return metrics_from_ranks(torch.cat(ranks), ks) | {"users": len(ev.targets)}


def popularity_scores(ds: Dataset, rows: np.ndarray) -> torch.Tensor:
    """Interaction counts per item over ``rows``: the popularity baseline's scores [I]."""
    counts = np.bincount(ds.item_index[rows], minlength=ds.num_items)
    return torch.from_numpy(counts.astype(np.float32))


def evaluate_popularity(
    ds: Dataset, rows: np.ndarray, ev: EvalSet, *, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Popularity baseline (counts over ``rows``), same protocol as :func:`evaluate`."""
    pop = popularity_scores(ds, rows)  # [I]
    return evaluate(lambda hs: pop.expand(len(hs), -1), ev, ks=ks)
