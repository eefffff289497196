"""Ranking and classification metrics, vectorised over batches of users.

* :mod:`recsys.metrics.ranking`: HR@K, NDCG@K, MRR@K from the rank of a held-out target.
* :mod:`recsys.metrics.auc`: AUC over sampled negatives (per event, per user, UAUC and
  impression-weighted UAUC) and global / grouped AUC by the rank-sum formula.
* :mod:`recsys.metrics.bootstrap`: confidence intervals of event averages that resample
  users (one user's events are correlated).
"""

from recsys.metrics.auc import auc, grouped_auc, per_user_auc, sampled_auc, uauc
from recsys.metrics.bootstrap import user_bootstrap_ci
from recsys.metrics.ranking import (
    hit_rate_at_k,
    mrr_at_k,
    ndcg_at_k,
    rank_metric,
    ranking_report,
    target_ranks,
)

__all__ = [
    "auc",
    "grouped_auc",
    "hit_rate_at_k",
    "mrr_at_k",
    "ndcg_at_k",
    "per_user_auc",
    "rank_metric",
    "ranking_report",
    "sampled_auc",
    "target_ranks",
    "uauc",
    "user_bootstrap_ci",
]
