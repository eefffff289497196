"""train_codebook, the report, the saved directory, and one real run on ml-100k."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from codebook import Codebook, CodebookConfig, SemanticIdMap, train_codebook
from codebook.quantizer import limited_threads
from codebook.report import usage_stats
from codebook.rqvae import RQVAEConfig
from recsys.errors import DataFormatError, ValidationError

FAST_RQVAE = RQVAEConfig(epochs=20, batch_size=64, hidden=[32], latent_dim=8)


def test_usage_stats_hand_worked() -> None:
    stats = usage_stats(np.array([0, 0, 1, 1]), 4)
    assert stats == {"used": 2, "usage": 0.5, "perplexity": pytest.approx(2.0), "dead": 2}
    assert usage_stats(np.array([3, 3, 3]), 4)["perplexity"] == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["rqkmeans", "rqvae"])
def test_duplicate_vectors_still_get_unique_ids(vectors, method) -> None:
    x = np.concatenate([vectors, vectors[:40], vectors[:40]])  # 80 exact duplicates
    config = CodebookConfig(method=method, codes=8, rqvae=FAST_RQVAE)
    cb = train_codebook(x, config)
    ids = cb.ids
    assert ids.num_items == len(x)
    assert len(np.unique(ids.codes, axis=0)) == len(x)
    report = cb.report
    assert report.final_unique
    assert report.collision_rate >= 80 / len(x)  # every duplicate collides
    assert report.max_per_prefix >= 3 and ids.vocab_sizes[-1] == report.max_per_prefix
    assert [row["level"] for row in report.rows()] == ["a", "b", "c", "d"]
    assert report.rows()[-1]["rel_mse"] == "-"
    errors = [lv.rel_mse for lv in report.levels[:3]]
    assert errors == sorted(errors, reverse=True)
    text = report.to_markdown()
    assert "| level" in text and "collision rate before disambiguation" in text


@pytest.mark.parametrize("method", ["rqkmeans", "rqvae"])
def test_save_load_round_trip(vectors, tmp_path: Path, method) -> None:
    item_ids = [f"it{i}" for i in range(len(vectors))]
    cb = train_codebook(
        vectors,
        CodebookConfig(method=method, codes=8, seed=2, rqvae=FAST_RQVAE),
        item_ids=item_ids,
        info={"dataset": "synthetic", "fingerprint": "abc", "feature_layout": {"x": [0, 16]}},
    )
    cb.save(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"codebook.json", "semantic_ids.npy", "semantic_ids.json"} <= names
    assert ("rqvae.pt" if method == "rqvae" else "rqkmeans.npz") in names
    back = Codebook.load(tmp_path)
    assert back.quantizer.method == method
    assert np.array_equal(back.ids.codes, cb.ids.codes)
    assert np.array_equal(back.encode(vectors), cb.ids.codes[:, :3])  # no retraining needed
    assert back.info["fingerprint"] == "abc" and back.info["feature_layout"] == {"x": [0, 16]}
    assert back.config.codes == 8 and back.config.seed == 2
    assert back.report["summary"]["final_unique"] is True
    meta = json.loads((tmp_path / "codebook.json").read_text())
    assert meta["vocab_sizes"] == cb.ids.vocab_sizes
    only_ids = SemanticIdMap.load(tmp_path)  # what the LLM side reads
    assert only_ids.to_tokens(5) == cb.ids.to_tokens(5)
    assert only_ids.item_index("it5") == 5


def test_deterministic_with_seed(vectors) -> None:
    for method in ("rqkmeans", "rqvae"):
        a = train_codebook(
            vectors, CodebookConfig(method=method, codes=8, seed=7, rqvae=FAST_RQVAE)
        )
        b = train_codebook(
            vectors, CodebookConfig(method=method, codes=8, seed=7, rqvae=FAST_RQVAE)
        )
        assert np.array_equal(a.ids.codes, b.ids.codes), method


def test_errors(vectors, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="unknown codebook method"):
        train_codebook(vectors, CodebookConfig(method="pq"))
    with pytest.raises(ValidationError, match="exceeds"):
        train_codebook(vectors[:10], CodebookConfig(method="rqkmeans", codes=16))
    with pytest.raises(DataFormatError, match=r"codebook\.json"):
        Codebook.load(tmp_path)


def test_real_ml100k_run(ml100k, tmp_path: Path) -> None:
    """ml-100k with collaborative vectors from its interaction matrix (no text model needed)."""
    from recsys.features import build_item_features

    matrix = np.zeros((ml100k.num_users, ml100k.num_items), dtype=np.float32)
    matrix[ml100k.user_index, ml100k.item_index] = 1.0
    with limited_threads(1):  # one BLAS thread: far faster on the shared 2-core machine
        _, _, vt = np.linalg.svd(matrix, full_matrices=False)
    features = build_item_features(
        ml100k, modalities=["collaborative"], collaborative=vt[:48].T, progress=False
    )
    cb = train_codebook(
        features.matrix,
        CodebookConfig(method="rqkmeans"),
        item_ids=ml100k.item_ids,
        info={"dataset": ml100k.name, "fingerprint": ml100k.fingerprint()},
    )
    assert cb.config.codes == 64  # sized to 1,682 items
    assert cb.report.final_unique and cb.ids.num_items == 1682
    assert all(level.usage > 0.9 for level in cb.report.levels[:3])
    cb.verify(ml100k)
    cb.save(tmp_path)
    assert Codebook.load(tmp_path).ids.parse(cb.ids.to_tokens(100)) == 100
