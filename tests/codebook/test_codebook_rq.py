"""RQ-k-means and the shared quantiser helpers: shapes, determinism, persistence, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codebook.quantizer import (
    ResidualQuantizer,
    check_codes,
    default_codes,
    limited_threads,
    nearest,
    relative_mse,
)
from codebook.rq_kmeans import RQKMeans, RQKMeansConfig
from recsys.errors import ValidationError


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_items=st.integers(8, 60),
    dim=st.integers(2, 12),
    levels=st.integers(1, 4),
    codes=st.integers(2, 8),
    pca=st.sampled_from([None, 3, 64]),
    seed=st.integers(0, 2**16),
)
def test_quantise_dequantise_shapes(num_items, dim, levels, codes, pca, seed) -> None:
    x = np.random.default_rng(seed).normal(size=(num_items, dim)).astype(np.float32)
    q = RQKMeans(RQKMeansConfig(levels=levels, codes=codes, pca_dim=pca, seed=seed, niter=5)).fit(x)
    assert isinstance(q, ResidualQuantizer)
    c = q.encode(x)
    assert c.shape == (num_items, levels) and c.dtype == np.int64
    assert c.min() >= 0 and c.max() < codes
    assert q.decode(c).shape == (num_items, dim)
    for prefix in range(1, levels + 1):
        assert q.decode(c[:, :prefix]).shape == (num_items, dim)
    one = q.encode(x[:1])
    assert one.shape == (1, levels)
    assert np.array_equal(one, c[:1])


def test_more_levels_reconstruct_better(vectors) -> None:
    q = RQKMeans(RQKMeansConfig(levels=3, codes=8)).fit(vectors)
    c = q.encode(vectors)
    errors = [relative_mse(vectors, q.decode(c[:, : p + 1])) for p in range(3)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.5


def test_same_seed_same_codebook(vectors) -> None:
    a = RQKMeans(RQKMeansConfig(codes=8, seed=3)).fit(vectors)
    b = RQKMeans(RQKMeansConfig(codes=8, seed=3)).fit(vectors)
    assert np.array_equal(a.centroids, b.centroids)
    assert np.array_equal(a.encode(vectors), b.encode(vectors))
    c = RQKMeans(RQKMeansConfig(codes=8, seed=4)).fit(vectors)
    assert not np.array_equal(a.centroids, c.centroids)


def test_save_load_round_trip(vectors, tmp_path: Path) -> None:
    q = RQKMeans(RQKMeansConfig(codes=8)).fit(vectors)
    q.save(tmp_path)
    back = RQKMeans.load(tmp_path, q.config_dict())
    assert np.array_equal(back.encode(vectors), q.encode(vectors))
    assert np.allclose(back.decode(q.encode(vectors)), q.decode(q.encode(vectors)))


def test_default_codes_sized_to_catalogue() -> None:
    assert default_codes(1682) == 64  # ml-100k
    assert default_codes(6710) == 128  # tiktok
    assert default_codes(100) == 16
    assert default_codes(50_000) == 256
    assert default_codes(3) == 3  # never more codes than items
    with pytest.raises(ValidationError):
        default_codes(0)


def test_clear_errors(vectors) -> None:
    with pytest.raises(ValidationError, match="at least as many vectors as codes"):
        RQKMeans(RQKMeansConfig(codes=500)).fit(vectors)
    with pytest.raises(ValidationError, match="NaN"):
        bad = vectors.copy()
        bad[3, 1] = np.nan
        RQKMeans(RQKMeansConfig(codes=4)).fit(bad)
    with pytest.raises(ValidationError, match="not trained"):
        RQKMeans().encode(vectors)
    q = RQKMeans(RQKMeansConfig(codes=4)).fit(vectors)
    with pytest.raises(ValidationError, match="D=16"):
        q.encode(vectors[:, :5])
    with pytest.raises(ValidationError, match=r"\[0, 4\)"):
        q.decode(np.array([[0, 9, 0]]))
    with pytest.raises(ValidationError, match="L'"):
        check_codes(np.zeros((2, 5), dtype=np.int64), 3, 4)


def test_nearest_breaks_ties_towards_lowest_index() -> None:
    centroids = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    x = np.array([[2.0, 0.0], [0.0, 3.0]], dtype=np.float32)
    assert nearest(x, centroids).tolist() == [0, 2]


def test_limited_threads_restores_settings() -> None:
    import faiss

    before = faiss.omp_get_max_threads()
    with limited_threads(1):
        assert faiss.omp_get_max_threads() == 1
    assert faiss.omp_get_max_threads() == before
