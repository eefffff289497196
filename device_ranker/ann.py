"""Large-catalogue ranking: approximate maximum-inner-product pre-selection with faiss,
then exact scores of the candidates.

The exact path scores every item, ``query @ item_table^T + item_bias`` [B, I]. Above
``AnnConfig.min_items`` items (or when forced on) :class:`AnnIndex` instead returns C
candidates per user from a faiss index built once over the item table, and
:func:`ann_topk` scores only those exactly, so every returned score is the exact one.

Bias and MIPS. The score is an inner product in D + 1 dimensions: item ``[x_i, b_i]``,
query ``[q, 1]``. Maximum inner product is then reduced to nearest neighbour in L2
(Bachrach et al., RecSys 2014): items get one more coordinate ``sqrt(M^2 - |x'_i|^2)``
(M the largest item norm, so every item has norm M), queries a 0, and
``|q' - x'_i|^2 = |q'|^2 + M^2 - 2 score_i``: the nearest items are the best-scoring.
Both IVF and HNSW then search in plain L2 over ``D + 2`` dimensions (zero-padded to a
multiple of 8, which faiss scans about a quarter faster: 11 vs 15 ms for 64 queries,
nprobe 24 of 316 lists, 10^5 items, one thread). Measured at 10^5 items against IVF on
the inner product directly (``[x, b]`` vs ``[q, 1]``), the L2 reduction reached recall@10
0.9935 at nprobe 32 of 316 lists where the inner product reached 0.989.

Exclusion. A user's excluded (seen) items are dropped from the candidates. The index is
searched for ``C = AnnConfig.candidates`` first; rows left with fewer than k are
searched again for ``k +`` their excluded items (capped at ``max_candidates``), and a
row still short (with more rankable items than it has) is scored exactly. The first
search's top-k after exclusion is the second's when both find k (IVF-Flat ranks a
probed list's items by their exact score).

Shapes: B users, D width, I items, C candidates, K top-k.

Example::

    index = AnnIndex(model.item_table, model.item_bias, AnnConfig(mode="on"))
    items, scores = ann_topk(index, queries, exclude=[seen_b, ...], k=10)   # [B, K] each
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from device_ranker.config import AnnConfig
from recsys.errors import ValidationError

logger = logging.getLogger(__name__)


def _faiss():
    import faiss  # lazy: only large catalogues need it

    return faiss


class AnnIndex:
    """A faiss index over ``[item_table, item_bias]`` for maximum-inner-product search.

    Built once per item table (the item table never changes after training; an edit only
    changes the query).

    Args:
        item_table: [I, D] item embeddings (kept by reference for exact rescoring).
        item_bias: [I] per-item score bias, or None (no bias).
        cfg: :class:`AnnConfig` (kind, nlist / nprobe or M / efSearch).
    """

    def __init__(
        self, item_table: torch.Tensor, item_bias: torch.Tensor | None, cfg: AnnConfig
    ) -> None:
        faiss = _faiss()
        self.cfg = cfg
        self.table = item_table.detach()  # [I, D]
        n, d = self.table.shape
        self.bias = (
            item_bias.detach() if item_bias is not None else torch.zeros(n, dtype=self.table.dtype)
        )  # [I]
        t0 = time.perf_counter()
        self.dim = -(-(d + 2) // 8) * 8  # zero-padded to a multiple of 8: faiss scans faster
        vec = np.zeros((n, self.dim), dtype=np.float32)  # [I, D + 2 + pad]
        vec[:, :d] = self.table.numpy()
        vec[:, d] = self.bias.numpy()
        sq = np.einsum("ij,ij->i", vec[:, : d + 1], vec[:, : d + 1])  # [I]
        vec[:, d + 1] = np.sqrt(np.maximum(sq.max() - sq, 0.0))
        if cfg.kind == "ivf":
            self.nlist = min(n, cfg.nlist or max(1, round(math.sqrt(n))))
            quantizer = faiss.IndexFlatL2(self.dim)
            index = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, faiss.METRIC_L2)
            index.cp.seed = cfg.seed
            index.cp.min_points_per_centroid = 1  # no warning for small catalogues in tests
            rng = np.random.default_rng(cfg.seed)
            sample = vec if n <= cfg.train_points else vec[rng.choice(n, cfg.train_points, False)]
            index.train(sample)
            index.add(vec)
            index.nprobe = min(cfg.nprobe, self.nlist)
        elif cfg.kind == "hnsw":
            self.nlist = 0
            index = faiss.IndexHNSWFlat(self.dim, cfg.hnsw_m, faiss.METRIC_L2)
            index.hnsw.efConstruction = cfg.ef_construction
            index.add(vec)
            index.hnsw.efSearch = cfg.ef_search
        else:  # pragma: no cover - the config's Literal refuses it
            raise ValidationError(f"unknown ANN index kind {cfg.kind!r} (ivf or hnsw)")
        self.index = index
        # rows ranked, rows that needed a second search (k + seen), rows scored exactly
        self.stats = {"rows": 0, "second_search": 0, "exact": 0}
        self.build_seconds = time.perf_counter() - t0
        self.nbytes = _index_bytes(faiss, index)
        logger.info(
            "built %s index over %d items (padded width %d) in %.1f s, %.1f MB",
            cfg.kind,
            n,
            self.dim,
            self.build_seconds,
            self.nbytes / 2**20,
        )

    @property
    def num_items(self) -> int:
        return self.table.shape[0]

    def search(self, queries: torch.Tensor, c: int) -> np.ndarray:
        """Queries [B, D] -> candidate item indices [B, C] (-1 where fewer were found)."""
        b, d = queries.shape
        q = np.zeros((b, self.dim), dtype=np.float32)  # [B, D + 2 + pad]
        q[:, :d] = queries.detach().numpy()
        q[:, d] = 1.0  # picks up the bias; the last coordinate stays 0
        c = min(c, self.num_items)
        if self.cfg.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.cfg.ef_search, c)
        _, idx = self.index.search(q, c)
        return idx  # [B, C] int64

    def set_search_param(self, value: int) -> None:
        """nprobe (IVF) or efSearch (HNSW), for the benchmark's sweeps."""
        if self.cfg.kind == "ivf":
            self.index.nprobe = min(value, self.nlist)
        else:
            self.cfg = replace(self.cfg, ef_search=value)
            self.index.hnsw.efSearch = value


def _index_bytes(faiss, index) -> int:
    """Serialized size of a faiss index (its vectors + structure) in bytes."""
    return int(faiss.serialize_index(index).size)


def candidate_count(cfg: AnnConfig, k: int, excluded: Sequence[int], num_items: int) -> int:
    """C for a batch: at least ``cfg.candidates`` and k + the most excluded items of any
    row, capped at ``cfg.max_candidates`` and I."""
    most = max(excluded, default=0)
    return min(max(cfg.candidates, k + most), cfg.max_candidates, num_items)


def ann_topk(
    index: AnnIndex,
    queries: torch.Tensor,
    exclude: Sequence[np.ndarray | None],
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K of B users through the index, exact scores of the candidates.

    Args:
        index: :class:`AnnIndex` over the scoring item table.
        queries: [B, D] (edited) queries.
        exclude: B arrays of item indices never to return (seen items), or None.
        k: K.

    Returns:
        items [B, K] int64 and scores [B, K] float32, best first; -inf scores (item
        index undefined) past the rankable items, as ``Ranker.mask_and_topk``. Rows the
        index cannot fill are scored exactly over the whole catalogue.
    """
    if k < 1:
        raise ValidationError(f"k must be >= 1, got {k}")
    if len(exclude) != queries.shape[0]:
        raise ValidationError(f"{len(exclude)} exclusion lists for {queries.shape[0]} queries")
    n = index.num_items
    kk = min(k, n)
    excl = [np.unique(np.asarray(e, dtype=np.int64)) if e is not None else None for e in exclude]
    n_excl = [0 if e is None else len(e) for e in excl]
    rows = list(range(len(excl)))
    c1 = min(max(index.cfg.candidates, kk), n)
    with torch.inference_mode():
        items, values = _select(index, queries, excl, kk, c1)
        index.stats["rows"] += len(rows)
        short = _short(values, rows, kk, n, n_excl)
        c2 = candidate_count(index.cfg, kk, [n_excl[b] for b in short], n)
        if short and c2 > c1:  # seen items took too many candidates: fetch k + seen
            index.stats["second_search"] += len(short)
            it2, va2 = _select(index, queries[short], [excl[b] for b in short], kk, c2)
            items[short], values[short] = it2, va2
            short = _short(values, short, kk, n, n_excl)
        if short:
            index.stats["exact"] += len(short)
            ex_items, ex_values = exact_topk(index, queries[short], [excl[b] for b in short], kk)
            items[short], values[short] = ex_items, ex_values
    return items, values


def _short(values: torch.Tensor, rows: list[int], k: int, n: int, n_excl: list[int]) -> list[int]:
    """Rows (of ``rows``) with fewer than min(K, rankable) finite scores."""
    found = torch.isfinite(values[rows]).sum(dim=1).tolist()
    return [b for b, f in zip(rows, found, strict=True) if f < min(k, n - n_excl[b])]


def _select(
    index: AnnIndex, queries: torch.Tensor, excl: Sequence[np.ndarray | None], k: int, c: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """C candidates per row from the index, excluded ones dropped, exact scores, top-K:
    items [B, K], scores [B, K] (-inf where fewer than K candidates were left)."""
    b_rows = queries.shape[0]
    cand = index.search(queries, c)  # [B, C]
    bad = cand < 0  # [B, C]
    rows = [b for b, e in enumerate(excl) if e is not None and len(e)]
    if rows:  # one isin over (row, item) keys for the whole batch
        n = np.int64(index.num_items)
        seen_keys = np.concatenate([b * n + excl[b] for b in rows])
        cand_keys = np.arange(b_rows, dtype=np.int64)[:, None] * n + cand  # [B, C]
        bad |= np.isin(cand_keys, seen_keys) & (cand >= 0)
    cand_t = torch.from_numpy(np.where(bad, 0, cand))  # [B, C]
    scores = torch.einsum("bd,bcd->bc", queries, index.table[cand_t]) + index.bias[cand_t]
    scores = scores.masked_fill(torch.from_numpy(bad), float("-inf"))  # [B, C]
    top = torch.topk(scores, min(k, c), dim=1)
    items, values = cand_t.gather(1, top.indices), top.values  # [B, min(K, C)]
    if items.shape[1] < k:  # C < K: pad (those rows are short)
        pad = k - items.shape[1]
        items = torch.cat([items, torch.zeros(b_rows, pad, dtype=items.dtype)], 1)
        values = torch.cat([values, torch.full((b_rows, pad), float("-inf"))], 1)
    return items, values


def exact_topk(
    index: AnnIndex, queries: torch.Tensor, exclude: Sequence[np.ndarray | None], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-catalogue top-K of B queries [B, D] (the fallback and the reference):
    items [B, K], scores [B, K], excluded items -inf."""
    with torch.inference_mode():
        scores = torch.nn.functional.linear(queries, index.table, index.bias)  # [B, I]
        for b, e in enumerate(exclude):
            if e is not None and len(e):
                scores[b, torch.as_tensor(np.asarray(e, dtype=np.int64))] = float("-inf")
        top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    return top.indices, top.values


def recall_at_k(approx: np.ndarray | torch.Tensor, exact: np.ndarray | torch.Tensor) -> float:
    """Mean over users of ``|approx_b ∩ exact_b| / |exact_b|`` (recall@K of the
    approximate top-K against the exact top-K, both [B, K] item indices; entries < 0 are
    padding and ignored)."""
    a, e = np.asarray(approx), np.asarray(exact)
    if a.shape[0] != e.shape[0]:
        raise ValidationError(f"{a.shape[0]} approximate rows for {e.shape[0]} exact rows")
    rec = []
    for ra, re in zip(a, e, strict=True):
        truth = set(re[re >= 0].tolist())
        if truth:
            rec.append(len(truth & set(ra[ra >= 0].tolist())) / len(truth))
    return float(np.mean(rec)) if rec else float("nan")
