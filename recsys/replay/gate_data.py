"""The learned gate's training data: features and next-window gains on the training period.

For each training user (the time split's training period only) and each sampled pair
(``L``, age ``a``): the device has history ``seq[:L]`` and holds the edit made from
``seq[:L - a]``. The **label** is how much a fresh edit made now would improve the next
``horizon`` events over keeping that one:

    gain = mean_{p = L .. L+H-1} m(rank_new(p)) - m(rank_old(p))

with m = NDCG@10 (``label="ndcg"``) or the full-catalogue DCG ``1 / log2(1 + rank)``
(``label="dcg"``, smoother), ranks under the full system's edits (adaptor + prototype +
residual, through the payload, as the replay builds them: :class:`recsys.replay.edits.EditMaker`),
seen items excluded. The **features** are the learned gate's
(:mod:`device_ranker.learned_gate`), computed from the history and the base model's
ranks of the user's clicks, vectorised over (user, L, anchor) by :class:`Tracks`; the
calibration simulation (:mod:`recsys.replay.gate_training`) reads the same tracks.

The adaptor was trained on the whole training period, so these edits are in-sample:
labels are optimistic in level; the gate needs only their ranking over (L, a).

Shapes: U users, N samples, F features, D item-vector width, H horizon.

Example::

    tracks, samples = build_gate_data(art_path, cache, ds, GateDataConfig(horizon=10))
    samples.x.shape, samples.y["ndcg"].shape     # [N, F], [N]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from tqdm.auto import tqdm

from codebook.adaptor_artifact import load_artifact
from device_ranker.features import seen_mask
from device_ranker.head import queries_per_user
from device_ranker.learned_gate import (
    RECENT_CLICKS,
    SINCE_CLICKS,
    feature_matrix,
    normalised_log_rank,
)
from device_ranker.ranker import Ranker
from recsys.data import Dataset, time_split, user_sequences
from recsys.metrics import target_ranks
from recsys.replay.config import ReplayConfig
from recsys.replay.edits import EditMaker
from recsys.validation import config_dataclass
from recsys.workflows.adaptor_config import config_from_dict
from recsys.workflows.adaptor_data import device_bounds

logger = logging.getLogger(__name__)

LABELS = ("ndcg", "dcg")


@config_dataclass
class GateDataConfig:
    """How the training samples are drawn.

    Attributes:
        horizon: H, next events the label averages (a request serves ~1/budget events).
        samples_per_user: (L, a) pairs per training user.
        max_age: largest age a of the held edit (drawn log-uniformly in 1..max_age).
        min_history: as the replay's (first request, evaluated events).
        window: the gate window W (as ``ReplayConfig.gate_window``).
        max_users: a seeded sample of at most this many training users (None = all).
        seed: sampling seed.
        batch_size: histories per encoder / scoring batch.
    """

    horizon: int = Field(10, ge=1)
    samples_per_user: int = Field(8, ge=1)
    max_age: int = Field(40, ge=1)
    min_history: int = Field(5, ge=2)
    window: int = Field(10, ge=1)
    max_users: int | None = Field(None, ge=1)
    seed: int = 0
    batch_size: int = Field(256, ge=1)


class Tracks:
    """Per-(user, history length) quantities of the gate features, flattened.

    Row ``start[u] + L`` (L = 0..len_u) of each array describes ``seq_u[:L]``:
    ``vec`` the unit mean vector of its last W items [*, D] (the shift gate's window),
    ``cs_lr`` / ``cn_lr`` cumulative sums / counts of the known normalised base log-ranks
    of the clicks at positions < L, ``cs_pop`` the cumulative popularity of its items.
    """

    def __init__(
        self,
        sequences: Sequence[np.ndarray],
        base_ranks: Sequence[np.ndarray],
        item_vectors: np.ndarray,
        popularity: np.ndarray,
        window: int,
    ) -> None:
        unit = item_vectors / np.maximum(np.linalg.norm(item_vectors, axis=1, keepdims=True), 1e-12)
        num_items = len(item_vectors)
        self.window = window
        self.lengths = np.array([len(s) for s in sequences], dtype=np.int64)  # [U]
        self.start = np.concatenate([[0], np.cumsum(self.lengths + 1)[:-1]]).astype(np.int64)
        vec, cs_lr, cn_lr, cs_pop = [], [], [], []
        for seq, ranks in zip(sequences, base_ranks, strict=True):
            seq = np.asarray(seq, dtype=np.int64)
            v = unit[seq]  # [n, D]
            cs = np.vstack([np.zeros((1, unit.shape[1])), np.cumsum(v, axis=0)])  # [n + 1, D]
            lo = np.maximum(np.arange(len(seq) + 1) - window, 0)
            w = cs - cs[lo]
            vec.append(w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12))
            lr = normalised_log_rank(ranks, num_items)  # [n]
            known = np.isfinite(lr)
            cs_lr.append(np.concatenate([[0.0], np.cumsum(np.where(known, lr, 0.0))]))
            cn_lr.append(np.concatenate([[0], np.cumsum(known)]))
            cs_pop.append(np.concatenate([[0.0], np.cumsum(popularity[seq])]))
        d = unit.shape[1]
        self.vec = np.vstack(vec) if vec else np.zeros((0, d))  # [sum(n + 1), D]
        self.cs_lr = np.concatenate(cs_lr) if cs_lr else np.zeros(0)
        self.cn_lr = np.concatenate(cn_lr) if cn_lr else np.zeros(0, np.int64)
        self.cs_pop = np.concatenate(cs_pop) if cs_pop else np.zeros(0)

    def _mean_lr(self, u: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Mean known log-rank over positions [lo, hi) of users u (0.5 when none)."""
        a, b = self.start[u] + lo, self.start[u] + hi
        n = self.cn_lr[b] - self.cn_lr[a]
        return np.where(n > 0, (self.cs_lr[b] - self.cs_lr[a]) / np.maximum(n, 1), 0.5)

    def features(self, u: np.ndarray, length: np.ndarray, anchor: np.ndarray) -> np.ndarray:
        """[N, F] gate features of users ``u`` [N] with history length ``length`` [N] and
        their last request at ``anchor`` [N] (< length)."""
        u, length, anchor = (np.asarray(x, dtype=np.int64) for x in (u, length, anchor))
        now, anc = self.vec[self.start[u] + length], self.vec[self.start[u] + anchor]
        shift = np.clip((1.0 - np.einsum("nd,nd->n", now, anc)) / 2.0, 0.0, 1.0)
        recent = self._mean_lr(u, np.maximum(length - RECENT_CLICKS, 0), length)
        since = self._mean_lr(u, np.maximum(anchor, length - SINCE_CLICKS), length)
        lo = np.maximum(length - self.window, 0)
        pop = (self.cs_pop[self.start[u] + length] - self.cs_pop[self.start[u] + lo]) / np.maximum(
            length - lo, 1
        )
        return feature_matrix(shift, length - anchor, length, recent, since, pop)


@dataclass
class GateSamples:
    """Training rows: ``x`` [N, F], ``y`` label name -> [N], ``user`` [N] (index into the
    tracks' users), ``length`` / ``age`` [N]."""

    x: np.ndarray
    y: dict[str, np.ndarray]
    user: np.ndarray
    length: np.ndarray
    age: np.ndarray


def item_popularity(ds: Dataset, quantile: float) -> np.ndarray:
    """[I] ``log(1 + training count) / log(1 + max count)``: training period only."""
    train = time_split(ds, quantile=quantile).train
    counts = np.bincount(ds.item_index[train], minlength=ds.num_items).astype(np.float64)
    return np.log1p(counts) / np.log1p(max(counts.max(), 1.0))


class _Scorer:
    """States and ranks of one ranker, batched."""

    def __init__(self, ranker: Ranker, batch_size: int) -> None:
        self.ranker, self.bs = ranker, batch_size

    def states(self, hists: list[np.ndarray]) -> torch.Tensor:
        """[K, D] user states of K histories."""
        parts = [
            self.ranker.user_states(hists[i : i + self.bs]) for i in range(0, len(hists), self.bs)
        ]
        return torch.cat(parts) if parts else torch.zeros(0, self.ranker.model.item_table.shape[1])

    def ranks(
        self, states: torch.Tensor, hists: list[np.ndarray], targets: np.ndarray, weights: list
    ) -> np.ndarray:
        """[K] ranks of ``targets`` [K] (seen items excluded) with per-row head weights."""
        model, out = self.ranker.model, []
        tg = torch.from_numpy(np.asarray(targets, dtype=np.int64))
        with torch.inference_mode():
            for a in range(0, len(hists), self.bs):
                b = min(a + self.bs, len(hists))
                q = queries_per_user(model.head, states[a:b], weights[a:b])  # [B, D]
                scores = model.item_scores(q)  # [B, I]
                mask = seen_mask(hists[a:b], self.ranker.num_items)
                out.append(target_ranks(scores, tg[a:b], mask))
        return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def _ndcg10(ranks: np.ndarray) -> np.ndarray:
    return np.where(ranks <= 10, 1.0 / np.log2(1.0 + ranks), 0.0)


def _dcg(ranks: np.ndarray) -> np.ndarray:
    return 1.0 / np.log2(1.0 + ranks)


def build_gate_data(
    art_path: Path, cache: Path, ds: Dataset, cfg: GateDataConfig, *, progress: bool = True
) -> tuple[Tracks, GateSamples, list[np.ndarray], np.ndarray]:
    """Tracks of every training user, the labelled samples, the users' sequences and the
    item popularity [I] (see the module docstring)."""
    art = load_artifact(art_path)
    tcfg = config_from_dict(art["config"])
    ranker = Ranker.from_checkpoint(
        art["ranker_path"], bounds=device_bounds(art["bounds"], tcfg.rank)
    )
    rcfg = ReplayConfig(quantile=tcfg.quantile, min_history=cfg.min_history, gate_window=cfg.window)
    maker = EditMaker(art, Path(cache), ds.name, rcfg, ranker, {"system"})
    scorer = _Scorer(ranker, cfg.batch_size)
    seqs_all = user_sequences(ds, time_split(ds, quantile=tcfg.quantile).train)
    users = np.flatnonzero([len(s) > cfg.min_history for s in seqs_all])
    rng = np.random.default_rng(cfg.seed)
    if cfg.max_users is not None and len(users) > cfg.max_users:
        users = np.sort(rng.choice(users, cfg.max_users, replace=False))
    seqs = [np.asarray(seqs_all[u], dtype=np.int64) for u in users]
    popularity = item_popularity(ds, tcfg.quantile)
    ranks_all, rows = [], []
    x_parts: list[tuple[int, np.ndarray, np.ndarray]] = []
    try:
        for k, seq in enumerate(tqdm(seqs, desc="gate data", unit="user", disable=not progress)):
            n = len(seq)
            hists = [seq[:p] for p in range(1, n + 1)]  # lengths 1..n
            states = scorer.states(hists)  # [n, D]; row L - 1 = history length L
            base = np.full(n, np.nan)
            base[1:] = scorer.ranks(states[: n - 1], hists[: n - 1], seq[1:], [None] * (n - 1))
            ranks_all.append(base)
            hi = n - cfg.horizon  # L + H <= n: the H next events are in the training period
            if hi < cfg.min_history + 1:
                continue
            ls = rng.integers(cfg.min_history + 1, hi + 1, size=cfg.samples_per_user)
            cap = np.minimum(cfg.max_age, ls - cfg.min_history)
            ages = np.floor(np.exp(rng.uniform(0, np.log(cap + 1)))).astype(np.int64)
            ages = np.clip(ages, 1, cap)
            req = np.unique(np.concatenate([ls, ls - ages]))
            edits = maker.cloud_edits(
                "adaptor", seq, req, states[req - 1], {"system": set(req.tolist())}
            )["system"]
            pos = (ls[:, None] + np.arange(cfg.horizon)[None, :]).ravel()  # [S * H]
            new_w = [edits[int(L)].prepared.weights for L in np.repeat(ls, cfg.horizon)]
            old_w = [edits[int(L)].prepared.weights for L in np.repeat(ls - ages, cfg.horizon)]
            ph = [hists[p - 1] for p in pos]
            st = states[torch.from_numpy(pos - 1)]
            r_new = scorer.ranks(st, ph, seq[pos], new_w).reshape(len(ls), cfg.horizon)
            r_old = scorer.ranks(st, ph, seq[pos], old_w).reshape(len(ls), cfg.horizon)
            rows.append(
                {
                    "ndcg": (_ndcg10(r_new) - _ndcg10(r_old)).mean(axis=1),
                    "dcg": (_dcg(r_new) - _dcg(r_old)).mean(axis=1),
                }
            )
            x_parts.append((k, ls, ages))
    finally:
        maker.close()
    tracks = Tracks(
        seqs, ranks_all, ranker.model.item_table.detach().numpy(), popularity, cfg.window
    )
    if not x_parts:
        raise ValueError(
            f"no training user has more than min_history + horizon = "
            f"{cfg.min_history + cfg.horizon} events; lower --horizon"
        )
    u = np.concatenate([np.full(len(ls), k) for k, ls, _ in x_parts])
    length = np.concatenate([ls for _, ls, _ in x_parts])
    age = np.concatenate([a for _, _, a in x_parts])
    x = tracks.features(u, length, length - age)
    y = {name: np.concatenate([r[name] for r in rows]) for name in LABELS}
    logger.info("gate data: %d samples of %d users", len(x), len(x_parts))
    return tracks, GateSamples(x, y, u, length, age), seqs, popularity
