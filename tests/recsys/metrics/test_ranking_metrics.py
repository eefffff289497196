"""HR@K, NDCG@K, MRR@K: hand-worked examples, ties, exclusion masks and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from recsys.errors import ValidationError
from recsys.metrics import hit_rate_at_k, mrr_at_k, ndcg_at_k, ranking_report, target_ranks


def test_hand_worked_ranks_and_metrics() -> None:
    scores = torch.tensor(
        [
            [0.1, 0.9, 0.5, 0.3],  # target 2 (0.5): only 0.9 above -> rank 2
            [0.8, 0.2, 0.1, 0.0],  # target 0: best -> rank 1
            [0.4, 0.3, 0.2, 0.1],  # target 3: worst -> rank 4
        ]
    )  # [B=3, I=4]
    ranks = target_ranks(scores, torch.tensor([2, 0, 3]))
    assert ranks.tolist() == [2, 1, 4]
    assert hit_rate_at_k(ranks, 2).tolist() == [1.0, 1.0, 0.0]
    assert ndcg_at_k(ranks, 2).tolist() == pytest.approx([1 / math.log2(3), 1.0, 0.0])
    assert mrr_at_k(ranks, 2).tolist() == pytest.approx([0.5, 1.0, 0.0])
    # with K = I every target counts
    assert ndcg_at_k(ranks, 4).tolist() == pytest.approx([1 / math.log2(3), 1.0, 1 / math.log2(5)])
    assert mrr_at_k(ranks, 4).tolist() == pytest.approx([0.5, 1.0, 0.25])


def test_ties_are_pessimistic() -> None:
    # target 1 ties with items 0 and 3: all three count as "at or above" -> rank 3
    scores = torch.tensor([[0.5, 0.5, 0.1, 0.5]])
    assert target_ranks(scores, torch.tensor([1])).tolist() == [3]
    # a constant scorer puts every target last
    flat = torch.zeros(2, 5)
    assert target_ranks(flat, torch.tensor([0, 4])).tolist() == [5, 5]
    assert hit_rate_at_k(torch.tensor([5, 5]), 4).sum() == 0


def test_exclusion_mask_drops_items_but_never_the_target() -> None:
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1]])
    exclude = torch.tensor([[True, False, True, False]])
    # items 0 and 2 (above target 3) are excluded; item 1 stays above -> rank 2
    assert target_ranks(scores, torch.tensor([3]), exclude).tolist() == [2]
    # excluding the target itself has no effect: it is always kept
    exclude_target = torch.tensor([[False, False, False, True]])
    assert target_ranks(scores, torch.tensor([3]), exclude_target).tolist() == [4]


def test_minus_inf_masks_work_like_exclusion() -> None:
    scores = torch.tensor([[float("-inf"), 0.2, 0.7]])
    assert target_ranks(scores, torch.tensor([1])).tolist() == [2]


def test_ranking_report_means_over_users() -> None:
    report = ranking_report(torch.tensor([1, 3]), ks=(1, 5))
    assert report["hr@1"] == pytest.approx(0.5)
    assert report["hr@5"] == pytest.approx(1.0)
    assert report["ndcg@5"] == pytest.approx((1.0 + 0.5) / 2)
    assert report["mrr@5"] == pytest.approx((1.0 + 1 / 3) / 2)
    assert math.isnan(ranking_report(torch.tensor([], dtype=torch.int64), ks=(1,))["hr@1"])


@pytest.mark.parametrize(
    ("scores", "targets", "exclude"),
    [
        (torch.zeros(2, 3), torch.tensor([0]), None),  # B mismatch
        (torch.zeros(3), torch.tensor([0]), None),  # not [B, I]
        (torch.zeros(1, 3), torch.tensor([3]), None),  # target out of range
        (torch.zeros(1, 3), torch.tensor([-1]), None),
        (torch.tensor([[0.1, float("nan"), 0.2]]), torch.tensor([1]), None),
        (torch.zeros(1, 3), torch.tensor([0]), torch.zeros(1, 2, dtype=torch.bool)),
    ],
)
def test_bad_input_raises_validation_error(scores, targets, exclude) -> None:
    with pytest.raises(ValidationError):
        target_ranks(scores, targets, exclude)


def test_k_must_be_positive() -> None:
    with pytest.raises(ValidationError):
        hit_rate_at_k(torch.tensor([1]), 0)


def test_rank_metric_is_the_numpy_twin_of_the_torch_metrics() -> None:
    import numpy as np
    import torch

    from recsys.errors import ValidationError
    from recsys.metrics import hit_rate_at_k, mrr_at_k, ndcg_at_k, rank_metric

    ranks = np.array([1, 2, 3, 10, 11, 500])
    t = torch.from_numpy(ranks)
    for name, fn in (("hr", hit_rate_at_k), ("ndcg", ndcg_at_k), ("mrr", mrr_at_k)):
        np.testing.assert_allclose(rank_metric(name, ranks, 10), fn(t, 10).numpy(), rtol=1e-15)
    assert rank_metric("ndcg", ranks, 10)[0] == 1.0 and rank_metric("ndcg", ranks, 10)[4] == 0.0
    try:
        rank_metric("auc", ranks)
    except ValidationError:
        pass
    else:
        raise AssertionError("an unknown metric must be refused")
