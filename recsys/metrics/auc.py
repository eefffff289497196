"""AUC metrics: over sampled negatives (per event, per user) and globally (rank-sum).

Definitions (ties between a positive and a negative count 1/2 everywhere):

* **Sampled AUC** of one event b with positive score p_b and M sampled negatives n_{b,j}::

      AUC_b = (1 / M_b) * sum_j ( 1[p_b > n_{b,j}] + 0.5 * 1[p_b = n_{b,j}] )

  where M_b is the number of valid (unmasked) negatives of that row.
* **Per-user AUC** pools the pairs of all the user's events:
  AUC_u = sum_{b in u} M_b * AUC_b / sum_{b in u} M_b (the fraction of the user's
  (positive, negative) pairs ordered correctly; the mean of AUC_b when M_b is constant).
* **UAUC** (user-averaged AUC) = (1 / U) * sum_u AUC_u: every user counts once, so heavy
  users do not dominate.
* **Impression-weighted UAUC** (GAUC, Zhou et al., "Deep Interest Network for
  Click-Through Rate Prediction", KDD 2018) = sum_u w_u AUC_u / sum_u w_u with w_u the
  user's number of events (impressions).
* **Global AUC** of scores s [N] with binary labels y [N] is the Mann-Whitney U statistic
  normalised by the pair count::

      AUC = (R_+ - P (P + 1) / 2) / (P * Q)

  where R_+ is the sum of the (1-based, mid-ranked for ties) ranks of the P positives
  among all N scores in ascending order and Q = N - P the number of negatives.
  Reference: Hanley & McNeil, "The meaning and use of the area under a receiver
  operating characteristic (ROC) curve", Radiology 143(1), 1982; Mann & Whitney, Ann.
  Math. Statist. 18(1), 1947.

Everything is vectorised with torch (float64 arithmetic); inputs may be tensors or
numpy arrays. NaN scores are rejected, since they have no order.

Example::

    pos = torch.tensor([0.9, 0.2])                    # [B=2]
    neg = torch.tensor([[0.1, 0.9], [0.5, 0.6]])      # [B=2, M=2]
    sampled_auc(pos, neg)                             # tensor([0.75, 0.00])
    uauc(pos, neg)                                    # 0.375
    auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))  # 0.75
"""

from __future__ import annotations

from typing import Any

import torch

from recsys.errors import ValidationError


def _as_tensor(x: Any, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = torch.as_tensor(x)
    if dtype is not None:
        t = t.to(dtype)
    if t.is_floating_point() and torch.isnan(t).any():
        raise ValidationError(f"{name} contains NaN; scores must be ordered values")
    return t


def sampled_auc(pos_scores: Any, neg_scores: Any, neg_mask: Any | None = None) -> torch.Tensor:
    """Per-event AUC of one positive against its M sampled negatives.

    Args:
        pos_scores: [B] score of each event's positive item.
        neg_scores: [B, M] scores of the sampled negatives.
        neg_mask: optional [B, M] bool, True for valid negatives (False = padding).

    Returns:
        [B] float64 AUC_b in [0, 1]; NaN for a row without valid negatives.

    Example::

        sampled_auc(torch.tensor([0.5]), torch.tensor([[0.1, 0.5, 0.9]]))  # tensor([0.5])
    """
    pos = _as_tensor(pos_scores, "pos_scores", torch.float64)
    neg = _as_tensor(neg_scores, "neg_scores", torch.float64)
    if pos.dim() != 1 or neg.dim() != 2 or neg.shape[0] != pos.shape[0]:
        raise ValidationError(
            f"expected pos_scores [B] and neg_scores [B, M], got {tuple(pos.shape)} and "
            f"{tuple(neg.shape)}"
        )
    wins = (neg < pos[:, None]).to(torch.float64) + 0.5 * (neg == pos[:, None]).to(torch.float64)
    if neg_mask is None:
        num = wins.sum(dim=1)  # [B]
        den = torch.full_like(num, float(neg.shape[1]))
    else:
        mask = torch.as_tensor(neg_mask, dtype=torch.bool)
        if mask.shape != neg.shape:
            raise ValidationError(
                f"neg_mask must have the shape of neg_scores {tuple(neg.shape)}, got "
                f"{tuple(mask.shape)}"
            )
        num = (wins * mask).sum(dim=1)
        den = mask.sum(dim=1).to(torch.float64)
    return torch.where(den > 0, num / den.clamp_min(1.0), torch.full_like(num, float("nan")))


def per_user_auc(
    pos_scores: Any, neg_scores: Any, users: Any, neg_mask: Any | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pair-pooled AUC per user from events with sampled negatives (see module docstring).

    Args:
        pos_scores: [B] positive score per event.
        neg_scores: [B, M] negative scores per event.
        users: [B] integer user id of each event (any integers, not necessarily dense).
        neg_mask: optional [B, M] bool, True for valid negatives.

    Returns:
        ``(user_ids [U], auc [U] float64, events [U] int64)`` for the U users that have
        at least one valid pair, users in ascending id order.
    """
    neg = _as_tensor(neg_scores, "neg_scores", torch.float64)
    row_auc = sampled_auc(pos_scores, neg, neg_mask)  # [B]
    if neg_mask is None:
        pairs = torch.full_like(row_auc, float(neg.shape[1]))
    else:
        pairs = torch.as_tensor(neg_mask, dtype=torch.bool).sum(dim=1).to(torch.float64)
    users_t = torch.as_tensor(users).to(torch.int64)
    if users_t.shape != row_auc.shape:
        raise ValidationError(
            f"users must have shape [B]={tuple(row_auc.shape)}, got {tuple(users_t.shape)}"
        )
    valid = pairs > 0
    uniq, inverse = torch.unique(users_t[valid], return_inverse=True)  # [U], [B_valid]
    correct = torch.zeros(len(uniq), dtype=torch.float64).index_add_(
        0, inverse, (row_auc * pairs)[valid]
    )
    total = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, pairs[valid])
    events = torch.bincount(inverse, minlength=len(uniq))
    return uniq, correct / total, events


def uauc(
    pos_scores: Any,
    neg_scores: Any,
    users: Any | None = None,
    neg_mask: Any | None = None,
    *,
    weighted: bool = False,
) -> float:
    """User-averaged AUC over sampled negatives.

    Args:
        pos_scores: [B] positive score per event.
        neg_scores: [B, M] negative scores per event.
        users: optional [B] integer user ids; None means one user per row.
        neg_mask: optional [B, M] bool, True for valid negatives.
        weighted: False for UAUC = mean_u AUC_u; True for impression-weighted UAUC
            (GAUC), each user weighted by its number of events.

    Returns:
        float in [0, 1]; NaN when no row has a valid negative.
    """
    pos = _as_tensor(pos_scores, "pos_scores", torch.float64)
    if users is None:
        users = torch.arange(pos.numel())  # shapes are checked by sampled_auc
    _, user_auc, events = per_user_auc(pos, neg_scores, users, neg_mask)
    if user_auc.numel() == 0:
        return float("nan")
    if weighted:
        w = events.to(torch.float64)
        return float((user_auc * w).sum() / w.sum())
    return float(user_auc.mean())


def _group_midranks(scores: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``scores`` in ascending order within each group, ties mid-ranked.

    Args:
        scores: [N] float64.
        groups: [N] int64 dense group index.

    Returns:
        [N] float64 ranks; a tie group of c equal scores starting at position r gets
        r + (c + 1) / 2 (the mean of the positions it spans).
    """
    n = scores.shape[0]
    order = torch.argsort(scores, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]  # sorted by (group, score)
    g_sorted, s_sorted = groups[order], scores[order]  # [N]
    new_group = torch.ones(n, dtype=torch.bool)
    new_group[1:] = g_sorted[1:] != g_sorted[:-1]
    new_tie = new_group.clone()
    new_tie[1:] |= s_sorted[1:] != s_sorted[:-1]
    tie_id = torch.cumsum(new_tie.to(torch.int64), 0) - 1  # [N]
    group_id = torch.cumsum(new_group.to(torch.int64), 0) - 1  # [N]
    tie_start = torch.nonzero(new_tie).squeeze(1)  # [T] sorted position of each tie's first
    group_start = torch.nonzero(new_group).squeeze(1)  # [G]
    tie_count = torch.bincount(tie_id).to(torch.float64)  # [T]
    first = (tie_start[tie_id] - group_start[group_id]).to(torch.float64)  # 0-based
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = first + (tie_count[tie_id] + 1.0) / 2.0
    return ranks


def _rank_sum_auc(
    scores: Any, labels: Any, groups: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group Mann-Whitney AUC. Returns (auc [G], positives [G], negatives [G])."""
    s = _as_tensor(scores, "scores", torch.float64)
    y = torch.as_tensor(labels)
    if s.dim() != 1 or y.shape != s.shape:
        raise ValidationError(
            f"expected scores [N] and labels [N], got {tuple(s.shape)} and {tuple(y.shape)}"
        )
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValidationError("labels must be binary (0/1 or bool)")
    y = y.to(torch.float64)
    g = torch.zeros(s.shape[0], dtype=torch.int64) if groups is None else groups
    num_groups = int(g.max()) + 1 if g.numel() else 0
    ranks = _group_midranks(s, g)  # [N]
    r_pos = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, g, ranks * y)  # [G]
    p = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, g, y)  # [G]
    q = torch.bincount(g, minlength=num_groups).to(torch.float64) - p  # [G]
    return (r_pos - p * (p + 1.0) / 2.0) / (p * q), p, q  # NaN/inf where p*q == 0


def auc(scores: Any, labels: Any) -> float:
    """Global ROC AUC by the rank-sum (Mann-Whitney) formula, ties counted 1/2.

    Args:
        scores: [N] scores (higher = more likely positive).
        labels: [N] binary labels (0/1 or bool).

    Returns:
        float in [0, 1]; equals ``sklearn.metrics.roc_auc_score(labels, scores)``.

    Raises:
        ValidationError: shape mismatch, NaN scores, non-binary labels, or only one class.
    """
    values, p, q = _rank_sum_auc(scores, labels, None)
    if values.numel() == 0 or p[0] == 0 or q[0] == 0:
        raise ValidationError("AUC needs at least one positive and one negative label")
    return float(values[0])


def grouped_auc(scores: Any, labels: Any, groups: Any, *, weighted: bool = False) -> float:
    """UAUC from flat (score, label, user) triples: mean over users of each user's AUC.

    Users with only positives or only negatives have no AUC and are skipped. With
    ``weighted=True`` each user is weighted by its number of rows (impressions), which
    is GAUC (Zhou et al., KDD 2018).

    Args:
        scores: [N] scores.
        labels: [N] binary labels.
        groups: [N] integer user (or query) id of each row.

    Returns:
        float in [0, 1]; NaN when no user has both classes.
    """
    g_raw = torch.as_tensor(groups)
    if g_raw.dim() != 1:
        raise ValidationError(f"groups must be [N], got {tuple(g_raw.shape)}")
    _, g = torch.unique(g_raw, return_inverse=True)
    values, p, q = _rank_sum_auc(scores, labels, g)
    ok = (p > 0) & (q > 0)
    if not bool(ok.any()):
        return float("nan")
    if weighted:
        w = (p + q)[ok]
        return float((values[ok] * w).sum() / w.sum())
    return float(values[ok].mean())
