"""Top-K ranking metrics from the rank of one held-out target item per user.

All functions are vectorised over a batch of B users (torch tensors, no Python loops
over items) and return per-user values [B]; callers average (or use
:func:`ranking_report`).

Ranks are 1-based: rank 1 means the target scored highest among the candidates. Ties
are broken pessimistically (an item scoring equal to the target counts as above it), so
a constant scorer cannot look good.

Example::

    scores = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1]])   # [B=2, I=3]
    ranks = target_ranks(scores, torch.tensor([2, 0]))          # tensor([2, 1])
    hit_rate_at_k(ranks, 1)                                     # tensor([0., 1.])
    ranking_report(ranks, ks=(1, 2))  # {'hr@1': 0.5, 'ndcg@1': 0.5, 'mrr@1': 0.5, 'hr@2': 1.0, ...}
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from recsys.errors import ValidationError


def target_ranks(
    scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """1-based rank of each user's target among all candidates.

    rank_b = #{ i : keep_{b,i} and s_{b,i} >= s_{b,t_b} }, which counts the target itself,
    so ties with the target are placed above it (pessimistic).

    Args:
        scores: [B, I] candidate scores (higher is better); ``-inf`` is allowed (it is
            the usual way to mask), NaN is rejected.
        targets: [B] int64 index of the true item in each row.
        exclude: optional [B, I] bool, True for candidates to drop (e.g. items the user
            has already seen); the target itself is never excluded.

    Returns:
        [B] int64 ranks in 1..I.

    Raises:
        ValidationError: wrong shapes, a target index outside [0, I), or NaN scores.

    Example::

        target_ranks(torch.tensor([[0.1, 0.9, 0.5]]), torch.tensor([2]))  # tensor([2])
    """
    if scores.dim() != 2 or targets.dim() != 1 or scores.shape[0] != targets.shape[0]:
        raise ValidationError(
            f"expected scores [B, I] and targets [B], got {tuple(scores.shape)} and "
            f"{tuple(targets.shape)}"
        )
    if exclude is not None and exclude.shape != scores.shape:
        raise ValidationError(
            f"exclude must have the shape of scores {tuple(scores.shape)}, got "
            f"{tuple(exclude.shape)}"
        )
    num_items = scores.shape[1]
    targets = targets.to(torch.int64)
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_items):
        raise ValidationError(
            f"target indices must lie in [0, {num_items}); got {targets.tolist()[:8]}"
        )
    if torch.isnan(scores).any():
        # NaN compares False with everything: the target would get rank 0 (a perfect score)
        raise ValidationError("scores contain NaN; check the model output before ranking")
    target_scores = scores.gather(1, targets.view(-1, 1))  # [B, 1]
    above = scores >= target_scores  # [B, I], includes the target itself
    if exclude is not None:
        keep = ~exclude.to(torch.bool)
        keep = keep.scatter(1, targets.view(-1, 1), True)
        above &= keep
    return above.sum(dim=1)


def _check_k(k: int) -> None:
    if int(k) < 1:
        raise ValidationError(f"k must be a positive integer, got {k}")


def hit_rate_at_k(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """HR@K = 1[rank <= K]. [B] float64."""
    _check_k(k)
    return (ranks <= k).to(torch.float64)


def ndcg_at_k(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """NDCG@K with one relevant item = 1[rank <= K] / log2(rank + 1) (ideal DCG is 1).

    Reference: Järvelin & Kekäläinen, "Cumulated gain-based evaluation of IR
    techniques", TOIS 2002. [B] float64.
    """
    _check_k(k)
    r = ranks.to(torch.float64)
    return torch.where(ranks <= k, 1.0 / torch.log2(r + 1.0), torch.zeros_like(r))


def mrr_at_k(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """MRR@K = 1[rank <= K] / rank (reciprocal rank, cut at K). [B] float64.

    Reference: Voorhees, "The TREC-8 Question Answering Track Report", TREC 1999.
    """
    _check_k(k)
    r = ranks.to(torch.float64)
    return torch.where(ranks <= k, 1.0 / r, torch.zeros_like(r))


def ranking_report(ranks: torch.Tensor, ks: Iterable[int] = (5, 10, 20)) -> dict[str, float]:
    """Mean HR@K, NDCG@K and MRR@K over the batch, keyed ``hr@10``, ``ndcg@10``, ``mrr@10``.

    Args:
        ranks: [B] 1-based ranks from :func:`target_ranks`.
        ks: cut-offs.

    Returns:
        dict of Python floats (NaN for an empty batch).
    """
    out: dict[str, float] = {}
    for k in ks:
        for name, fn in (("hr", hit_rate_at_k), ("ndcg", ndcg_at_k), ("mrr", mrr_at_k)):
            values = fn(ranks, k)
            out[f"{name}@{k}"] = float(values.mean()) if values.numel() else float("nan")
    return out


def rank_metric(name: str, ranks: np.ndarray, k: int = 10) -> np.ndarray:
    """Per-event ``hr@K``, ``ndcg@K`` or ``mrr@K`` (``name`` without the cut-off: "hr",
    "ndcg", "mrr") of 1-based ranks [E], as float64 [E]: the NumPy twin of
    :func:`hit_rate_at_k`, :func:`ndcg_at_k` and :func:`mrr_at_k` for event logs and
    replay records."""
    _check_k(k)
    r = np.asarray(ranks).astype(np.float64)
    hit = r <= k
    if name == "hr":
        return hit.astype(np.float64)
    if name == "ndcg":
        return np.where(hit, 1.0 / np.log2(r + 1.0), 0.0)
    if name == "mrr":
        return np.where(hit, 1.0 / r, 0.0)
    raise ValidationError(f"unknown rank metric {name!r}; use hr, ndcg or mrr")
