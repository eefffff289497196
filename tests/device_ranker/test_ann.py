"""The faiss pre-selection (device_ranker.ann): exact enough -> the exact top-k, seen
items never returned, the bias folded in, threshold switching, recall@k."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ranker_helpers import tiny_model_config

from device_ranker.ann import AnnIndex, ann_topk, candidate_count, exact_topk, recall_at_k
from device_ranker.config import AnnConfig
from device_ranker.model import SeqRanker
from device_ranker.ranker import Ranker
from device_ranker.service.ranking import RankJob, rank_batch

pytest.importorskip("faiss")


def _table(n: int = 3000, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(n, d, generator=g) * 0.3  # [I, D]
    ranks = torch.randperm(n, generator=g).float() + 1
    bias = -torch.log(ranks) * 0.5  # popularity skew: a few items with a large bias
    return table, bias


# exact enough: every IVF list probed / an HNSW beam over the whole catalogue
EXACT_IVF = AnnConfig(mode="on", kind="ivf", nlist=16, nprobe=16)
EXACT_HNSW = AnnConfig(mode="on", kind="hnsw", hnsw_m=16, ef_search=3000)


@pytest.mark.parametrize("cfg", [EXACT_IVF, EXACT_HNSW], ids=["ivf", "hnsw"])
def test_exact_enough_index_returns_the_exact_top_k(cfg: AnnConfig) -> None:
    table, bias = _table()
    index = AnnIndex(table, bias, cfg)
    q = torch.randn(20, 8, generator=torch.Generator().manual_seed(1))
    seen = [np.arange(b, 3000, 7 + b) for b in range(20)]  # up to ~430 seen items per user
    items, scores = ann_topk(index, q, seen, k=10)
    ex_items, ex_scores = exact_topk(index, q, seen, 10)
    assert torch.equal(items, ex_items)
    torch.testing.assert_close(scores, ex_scores)  # exact scores of the returned items
    for b in range(20):
        assert not np.isin(items[b].numpy(), seen[b]).any()
    assert recall_at_k(items.numpy(), ex_items.numpy()) == 1.0


def test_bias_is_folded_into_the_search() -> None:
    table, _ = _table()
    bias = torch.zeros(3000)
    bias[[5, 77, 2999]] = 50.0  # a huge bias wins whatever the query
    index = AnnIndex(table, bias, EXACT_IVF)
    items, _ = ann_topk(index, torch.randn(4, 8), [None] * 4, k=3)
    assert all(set(row) == {5, 77, 2999} for row in items.tolist())
    q = torch.randn(3, 8)
    assert torch.equal(
        ann_topk(index, q, [None] * 3, 10)[0], exact_topk(index, q, [None] * 3, 10)[0]
    )


def test_rows_left_short_by_exclusion_fall_back_to_exact() -> None:
    table, bias = _table(n=500)
    cfg = AnnConfig(mode="on", kind="ivf", nlist=8, nprobe=8, candidates=20, max_candidates=20)
    index = AnnIndex(table, bias, cfg)
    q = torch.randn(3, 8)
    best = exact_topk(index, q, [None] * 3, 40)[0]
    seen = [best[0, :30].numpy(), None, np.arange(0, 495)]  # row 2: 5 items left
    items, scores = ann_topk(index, q, seen, k=10)
    ex_items, _ = exact_topk(index, q, seen, 10)
    assert torch.equal(
        items[0], ex_items[0]
    )  # the 20 candidates (the true top 20) all seen -> exact
    assert torch.isfinite(scores[2]).sum() == 5  # only 5 rankable, -inf after them
    assert set(items[2, :5].tolist()) == set(range(495, 500))
    assert candidate_count(cfg, 10, [30, 0], 500) == 20  # capped


def test_recall_at_k_hand_worked() -> None:
    approx = np.array([[1, 2, 3], [4, 5, 6]])
    exact = np.array([[3, 2, 9], [7, 8, 9]])
    assert recall_at_k(approx, exact) == pytest.approx((2 / 3 + 0) / 2)
    assert recall_at_k(np.array([[1, -1]]), np.array([[1, -1]])) == 1.0  # padding ignored


def test_config_threshold_switching() -> None:
    assert not AnnConfig().active(49_999) and AnnConfig().active(50_000)
    assert AnnConfig(mode="on").active(10) and not AnnConfig(mode="off").active(10**7)
    assert AnnConfig(min_items=100).active(100)


def _ranker(ann: AnnConfig) -> Ranker:
    torch.manual_seed(0)
    return Ranker(SeqRanker(tiny_model_config(num_items=300)).eval(), ann=ann)


def test_ranker_switches_on_above_the_threshold_and_matches_exact() -> None:
    exact = _ranker(AnnConfig(mode="off"))
    below = _ranker(AnnConfig(min_items=301))
    above = _ranker(AnnConfig(min_items=300, nlist=8, nprobe=8))
    assert exact.ann_index() is None and below.ann_index() is None
    assert above.ann_index() is not None and above.ann_index() is above.ann_index()  # built once
    hists = [[1, 2, 3], [], list(range(0, 250)), [299]]
    ex_items, ex_scores = exact.recommend_batch(hists, k=10)
    items, scores = above.recommend_batch(hists, k=10)
    assert torch.equal(items, ex_items)
    torch.testing.assert_close(scores, ex_scores)
    rec, rec_ex = (
        above.recommend([5, 6], k=5, exclude=[7]),
        exact.recommend([5, 6], k=5, exclude=[7]),
    )
    assert rec.items.tolist() == rec_ex.items.tolist() and 7 not in rec.items.tolist()


def test_service_rank_batch_keeps_probes_exact_with_the_index() -> None:
    ranker = _ranker(AnnConfig(mode="on", nlist=8, nprobe=8))
    hist = np.array([1, 2, 3], dtype=np.int64)

    def job(**kw) -> RankJob:
        base = dict(history=hist, state=None, edit=None, k=5, exclude=hist, candidates=None)
        return RankJob(**{**base, **kw})

    jobs = [job(), job(probes=np.array([4])), job(full=True)]
    with_ann = rank_batch(ranker.model, 300, jobs, ranker.ann_index())
    without = rank_batch(ranker.model, 300, jobs)
    for a, b in zip(with_ann, without, strict=True):
        assert a.items == b.items
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)
    assert with_ann[0].raw is None and with_ann[1].probe_ranks == without[1].probe_ranks
    assert with_ann[2].raw is not None


def test_cli_bench_ann_on_a_tiny_ranker(tmp_path, capsys) -> None:
    import json

    from ranker_helpers import make_dataset

    from recsys.cli import main
    from recsys.data import write_dataset

    data = write_dataset(make_dataset(), tmp_path / "synthetic")
    common = ["--dataset", str(data), "--checkpoint", str(tmp_path / "r.pt")]
    common += ["--cache-dir", str(tmp_path / "cache")]
    train = ["--epochs", "1", "--dim", "8", "--max-len", "5", "--no-progress"]
    assert main(["train", "ranker", *common, *train]) == 0
    out = tmp_path / "ann.json"
    args = ["--sizes", "200,400", "--latency-users", "4", "--batch-size", "4", "--threads", "1"]
    assert main(["bench", "ann", *common, *args, "--json", str(out)]) == 0
    assert "hnsw" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [(r["items"], r["method"]) for r in rows][:3] == [
        (200, "exact"),
        (200, "ivf"),
        (200, "hnsw"),
    ]
    assert all(0.0 <= r["recall@10"] <= 1.0 for r in rows)


def test_device_ranking_builds_the_index_at_start() -> None:
    from device_ranker.service.ranking import Ranking
    from recsys.serving.batching import BatchConfig

    ranker = _ranker(AnnConfig(mode="on", nlist=8, nprobe=8))
    ranking = Ranking(ranker, BatchConfig(max_batch=4, max_wait_ms=0.0), inline=True)
    assert ranker._ann is not None  # built before the first request
    hist = np.array([1, 2], dtype=np.int64)
    job = RankJob(history=hist, state=None, edit=None, k=3, exclude=hist, candidates=None)
    out = ranking.rank_batch([job])[0]
    assert out.items == rank_batch(ranker.model, 300, [job])[0].items
    ranking.executor.shutdown()
