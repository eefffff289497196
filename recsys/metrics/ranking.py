"""Top-K ranking metrics from the rank of one held-out target item per user.

All functions are vectorised over a batch of B users (torch tensors, no Python loops
over items) and return per-user values [B]; callers average.

Ranks are 1-based: rank 1 means the target scored highest among the candidates. Ties
are broken pessimistically (an item scoring equal to the target counts as above it), so
a constant scorer cannot look good.
"""

from __future__ import annotations

import torch

from recsys.errors import ValidationError


def target_ranks(
    scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """1-based rank of each user's target among all candidates.

    Args:
        scores: [B, I] candidate scores (higher is better).
        targets: [B] int64 index of the true item in each row.
        exclude: optional [B, I] bool, True for candidates to drop (e.g. items the user
            has already seen); the target itself is never excluded.

    Returns:
        [B] int64 ranks in 1..I.

    Example::

        target_ranks(torch.tensor([[0.1, 0.9, 0.5]]), torch.tensor([2]))  # tensor([2])
    """
    if scores.dim() != 2 or targets.dim() != 1 or scores.shape[0] != targets.shape[0]:
        raise ValidationError(
            f"expected scores [B, I] and targets [B], got {tuple(scores.shape)} and "
            f"{tuple(targets.shape)}"
        )
    target_scores = scores.gather(1, targets.view(-1, 1))  # [B, 1]
    above = scores >= target_scores  # [B, I], includes the target itself
    if exclude is not None:
        keep = ~exclude
        keep = keep.scatter(1, targets.view(-1, 1), True)
        above &= keep
    return above.sum(dim=1)


def hit_rate_at_k(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """HR@K = 1[rank <= K]. [B] float."""
    return (ranks <= k).to(torch.float64)


def ndcg_at_k(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """NDCG@K with one relevant item = 1[rank <= K] / log2(rank + 1) (ideal DCG is 1).

    Reference: Järvelin & Kekäläinen, "Cumulated gain-based evaluation of IR
    techniques", TOIS 2002. [B] float.
    """
    r = ranks.to(torch.float64)
    return torch.where(ranks <= k, 1.0 / torch.log2(r + 1.0), torch.zeros_like(r))


def mrr_at_k(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """MRR@K = 1[rank <= K] / rank (reciprocal rank, cut at K). [B] float."""
    r = ranks.to(torch.float64)
    return torch.where(ranks <= k, 1.0 / r, torch.zeros_like(r))
