"""Property tests (hypothesis): metric ranges, monotonicity in K, AUC symmetry."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from recsys.metrics import auc, hit_rate_at_k, mrr_at_k, ndcg_at_k, sampled_auc, target_ranks

# small integer-valued scores so ties are frequent
score_matrices = st.tuples(st.integers(1, 6), st.integers(1, 12)).flatmap(
    lambda bi: st.tuples(
        arrays(np.float64, bi, elements=st.integers(-3, 3).map(float)),
        arrays(np.int64, (bi[0],), elements=st.integers(0, bi[1] - 1)),
    )
)


@settings(max_examples=60, deadline=None)
@given(score_matrices, st.integers(1, 15))
def test_ranking_metrics_in_unit_interval_and_monotone_in_k(data, k: int) -> None:
    scores, targets = data
    ranks = target_ranks(torch.from_numpy(scores), torch.from_numpy(targets))
    assert bool(((ranks >= 1) & (ranks <= scores.shape[1])).all())
    for fn in (hit_rate_at_k, ndcg_at_k, mrr_at_k):
        now, later = fn(ranks, k), fn(ranks, k + 1)
        assert bool(((now >= 0) & (now <= 1)).all())
        assert bool((later >= now).all())  # a larger cut-off never loses a hit
    # MRR <= NDCG <= HR for a single relevant item
    assert bool((mrr_at_k(ranks, k) <= ndcg_at_k(ranks, k) + 1e-12).all())
    assert bool((ndcg_at_k(ranks, k) <= hit_rate_at_k(ranks, k)).all())


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.float64, st.integers(2, 40), elements=st.integers(-5, 5).map(float)),
    st.data(),
)
def test_global_auc_in_unit_interval_and_flips_with_labels(scores, data) -> None:
    labels = data.draw(arrays(np.bool_, scores.shape))
    if labels.all() or not labels.any():
        labels[0] = not labels[0]
        if labels.all() or not labels.any():
            labels[-1] = not labels[-1]
    value = auc(scores, labels)
    assert 0.0 <= value <= 1.0
    # swapping the classes mirrors the AUC (ties stay at 1/2)
    assert abs(auc(scores, ~labels) - (1.0 - value)) < 1e-9
    # negating the scores mirrors it too
    assert abs(auc(-scores, labels) - (1.0 - value)) < 1e-9


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_sampled_auc_is_one_minus_swapped(b: int, m: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randint(-2, 3, (b,), generator=gen).double()
    neg = torch.randint(-2, 3, (b, m), generator=gen).double()
    out = sampled_auc(pos, neg)
    assert bool(((out >= 0) & (out <= 1)).all())
    # a positive better than all negatives has AUC 1
    assert bool((sampled_auc(neg.max(dim=1).values + 1, neg) == 1).all())
