"""AUC: hand-worked examples for sampled, per-user, UAUC, GAUC, global and grouped AUC."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recsys.errors import ValidationError
from recsys.metrics import auc, grouped_auc, per_user_auc, sampled_auc, uauc


def test_sampled_auc_counts_ties_as_half() -> None:
    pos = torch.tensor([0.5, 0.9, 0.0])  # [B=3]
    neg = torch.tensor([[0.1, 0.5, 0.9, 0.2], [0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.0, 0.0]])
    # row 0: wins over 0.1, 0.2; ties 0.5; loses to 0.9 -> (2 + 0.5) / 4
    assert sampled_auc(pos, neg).tolist() == pytest.approx([0.625, 1.0, 0.5])


def test_sampled_auc_with_padding_mask() -> None:
    pos = torch.tensor([0.5, 0.5])
    neg = torch.tensor([[0.1, 0.9, 0.0], [0.7, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = sampled_auc(pos, neg, mask)
    assert out.tolist() == pytest.approx([0.5, 0.0])
    empty = sampled_auc(pos, neg, torch.zeros(2, 3, dtype=torch.bool))
    assert torch.isnan(empty).all()


def test_uauc_averages_users_not_events() -> None:
    # user 7: two events with AUC 1.0 and 0.5; user 3: one event with AUC 0.0
    pos = torch.tensor([0.9, 0.5, 0.1])
    neg = torch.tensor([[0.1, 0.2], [0.4, 0.6], [0.2, 0.3]])
    users = torch.tensor([7, 7, 3])
    ids, values, events = per_user_auc(pos, neg, users)
    assert ids.tolist() == [3, 7]
    assert values.tolist() == pytest.approx([0.0, 0.75])
    assert events.tolist() == [1, 2]
    assert uauc(pos, neg, users) == pytest.approx((0.0 + 0.75) / 2)
    # impression-weighted (GAUC): (1 * 0.0 + 2 * 0.75) / 3
    assert uauc(pos, neg, users, weighted=True) == pytest.approx(0.5)
    # without users every row is its own user
    assert uauc(pos, neg) == pytest.approx((1.0 + 0.5 + 0.0) / 3)


def test_per_user_auc_pools_pairs_under_a_mask() -> None:
    # user 0: event A 1 valid pair (won), event B 3 valid pairs (1 won) -> 2 / 4
    pos = torch.tensor([0.9, 0.5])
    neg = torch.tensor([[0.1, 0.0, 0.0], [0.1, 0.6, 0.7]])
    mask = torch.tensor([[True, False, False], [True, True, True]])
    _, values, _ = per_user_auc(pos, neg, torch.tensor([0, 0]), mask)
    assert values.tolist() == pytest.approx([0.5])


def test_global_auc_hand_worked() -> None:
    # positives 0.35, 0.8; negatives 0.1, 0.4 -> pairs won: (0.35>0.1), (0.8>0.1), (0.8>0.4) = 3/4
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # a tie between a positive and a negative counts 1/2
    assert auc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)
    # ties: scores 1,1,2,2 with labels 0,1,0,1 -> pairs (1 vs 1)=.5, (1 vs 2)=0, (2 vs 1)=1, (2 vs 2)=.5
    assert auc(np.array([1.0, 1.0, 2.0, 2.0]), np.array([0, 1, 0, 1])) == pytest.approx(0.5)
    assert auc([3.0, 2.0, 1.0], [True, False, False]) == pytest.approx(1.0)


def test_global_auc_rejects_one_class_and_nan() -> None:
    with pytest.raises(ValidationError):
        auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValidationError):
        auc([0.1, float("nan")], [0, 1])
    with pytest.raises(ValidationError):
        auc([0.1, 0.2], [0, 2])
    with pytest.raises(ValidationError):
        auc([0.1, 0.2, 0.3], [0, 1])


def test_grouped_auc_skips_single_class_users() -> None:
    scores = [0.9, 0.1, 0.2, 0.8, 0.5, 0.4]
    labels = [1, 0, 1, 0, 1, 1]
    groups = [10, 10, 20, 20, 30, 30]  # user 30 has no negatives
    assert grouped_auc(scores, labels, groups) == pytest.approx((1.0 + 0.0) / 2)
    assert math.isnan(grouped_auc([0.1], [1], [0]))


def test_grouped_auc_matches_sampled_uauc() -> None:
    gen = torch.Generator().manual_seed(0)
    pos = torch.rand(6, generator=gen)
    neg = torch.rand(6, 5, generator=gen)
    # one group per event: grouped AUC over (pos + its negatives) == sampled AUC per row
    scores = torch.cat([pos[:, None], neg], dim=1).reshape(-1)
    labels = torch.cat([torch.ones(6, 1), torch.zeros(6, 5)], dim=1).reshape(-1)
    events = torch.arange(6).repeat_interleave(6)
    assert grouped_auc(scores, labels, events) == pytest.approx(uauc(pos, neg), abs=1e-12)
