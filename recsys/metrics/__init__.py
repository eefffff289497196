"""Ranking and classification metrics, vectorised over batches of users."""

from recsys.metrics.ranking import hit_rate_at_k, mrr_at_k, ndcg_at_k, target_ranks

__all__ = ["hit_rate_at_k", "mrr_at_k", "ndcg_at_k", "target_ranks"]
