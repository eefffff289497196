"""Agreement with peer implementations: scikit-learn roc_auc_score, torchmetrics retrieval.

Scores are continuous random draws, so ties have probability zero and the pessimistic
tie rule of ``target_ranks`` cannot differ from torchmetrics' sort order.
torchmetrics 1.0.3's ``RetrievalMRR`` has no ``top_k``: MRR is compared at K = I there
and MRR@K against a direct numpy computation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMRR, RetrievalNormalizedDCG

from recsys.metrics import (
    auc,
    grouped_auc,
    hit_rate_at_k,
    mrr_at_k,
    ndcg_at_k,
    sampled_auc,
    target_ranks,
)


def _torchmetrics_mean(
    metric, scores: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor
) -> float:
    """Flatten [B, I] scores into torchmetrics' (preds, target, indexes) over kept items."""
    b, i = scores.shape
    relevant = torch.zeros(b, i, dtype=torch.bool)
    relevant[torch.arange(b), targets] = True
    indexes = torch.arange(b)[:, None].expand(b, i)
    return float(metric(scores[keep], relevant[keep], indexes=indexes[keep]))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_ranking_metrics_match_torchmetrics(seed: int, k: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    b, i = 64, 50
    scores = torch.randn(b, i, generator=gen, dtype=torch.float64)  # continuous: no ties
    targets = torch.randint(0, i, (b,), generator=gen)
    exclude = torch.rand(b, i, generator=gen) < 0.3
    exclude[torch.arange(b), targets] = False
    keep = ~exclude
    ranks = target_ranks(scores, targets, exclude)

    ours_hr = float(hit_rate_at_k(ranks, k).mean())
    ours_ndcg = float(ndcg_at_k(ranks, k).mean())
    ref_hr = _torchmetrics_mean(RetrievalHitRate(top_k=k), scores, targets, keep)
    ref_ndcg = _torchmetrics_mean(RetrievalNormalizedDCG(top_k=k), scores, targets, keep)
    assert ours_hr == pytest.approx(ref_hr, abs=1e-6)
    assert ours_ndcg == pytest.approx(ref_ndcg, abs=1e-6)

    # full MRR (K >= I) against torchmetrics; MRR@K against numpy
    ref_mrr = _torchmetrics_mean(RetrievalMRR(), scores, targets, keep)
    assert float(mrr_at_k(ranks, i).mean()) == pytest.approx(ref_mrr, abs=1e-6)
    s = scores.numpy()
    t = targets.numpy()
    np_ranks = 1 + ((s > s[np.arange(b), t][:, None]) & keep.numpy()).sum(axis=1)
    np_mrr_k = np.where(np_ranks <= k, 1.0 / np_ranks, 0.0).mean()
    assert float(mrr_at_k(ranks, k).mean()) == pytest.approx(np_mrr_k, abs=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_global_auc_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 500
    labels = rng.random(n) < 0.3
    scores = rng.normal(size=n) + labels * 0.7
    assert auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)


def test_global_auc_matches_sklearn_with_heavy_ties() -> None:
    rng = np.random.default_rng(7)
    labels = rng.random(1000) < 0.5
    scores = rng.integers(0, 5, size=1000).astype(float)  # five distinct values
    assert auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)


def test_sampled_auc_matches_sklearn_per_row() -> None:
    rng = np.random.default_rng(3)
    b, m = 20, 30
    pos = rng.normal(size=b)
    neg = rng.normal(size=(b, m))
    ours = sampled_auc(torch.from_numpy(pos), torch.from_numpy(neg)).numpy()
    labels = np.r_[1, np.zeros(m)]
    ref = [roc_auc_score(labels, np.r_[pos[r], neg[r]]) for r in range(b)]
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_grouped_auc_matches_sklearn_per_group() -> None:
    rng = np.random.default_rng(11)
    n = 600
    groups = rng.integers(0, 12, size=n) * 5  # sparse ids
    labels = rng.random(n) < 0.4
    scores = rng.normal(size=n) + 0.5 * labels
    per_group = []
    weights = []
    for g in np.unique(groups):
        sel = groups == g
        if labels[sel].all() or not labels[sel].any():
            continue
        per_group.append(roc_auc_score(labels[sel], scores[sel]))
        weights.append(sel.sum())
    assert grouped_auc(scores, labels, groups) == pytest.approx(np.mean(per_group), abs=1e-6)
    assert grouped_auc(scores, labels, groups, weighted=True) == pytest.approx(
        np.average(per_group, weights=weights), abs=1e-6
    )
