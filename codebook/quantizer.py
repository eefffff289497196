"""What every residual quantiser of this package shares: the interface, input checks,
nearest-code search, k-means on one level, and the default codebook size.

Shapes: I items (or N rows), D input dim, L levels, K codes per level.

A residual quantiser maps a vector x [D] to L codes c_1..c_L, each in [0, K)::

    r_1 = x,   c_l = argmin_k ||r_l - C_l[k]||,   r_{l+1} = r_l - C_l[c_l]

(for the RQ-VAE the same happens in a learned latent space, see :mod:`codebook.rqvae`).
Coarse levels hold the broad direction of the vector, later levels the details, so
items sharing a code prefix are similar: the property the LLM exploits.

Example::

    q = RQKMeans(RQKMeansConfig(levels=3, codes=64)).fit(x)   # x: float32 [I, D]
    codes = q.encode(x)                                        # int64 [I, 3]
    x_hat = q.decode(codes)                                    # float32 [I, D]
    coarse = q.decode(codes[:, :1])                            # first level only
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import numpy as np

from recsys.errors import ValidationError

logger = logging.getLogger(__name__)

MIN_CODES = 4  # smallest automatic K (tiny test catalogues)
MAX_CODES = 256  # largest automatic K (TIGER's size for 10k-60k-item catalogues)


@runtime_checkable
class ResidualQuantizer(Protocol):
    """The interface of :class:`~codebook.rq_kmeans.RQKMeans` and
    :class:`~codebook.rqvae.RQVAEQuantizer`.

    Attributes:
        method: short name saved in the artefact (``"rqkmeans"``, ``"rqvae"``).
        levels: L.
        codes: K, codes per level.
        dim: D, the input dimension.
    """

    method: str
    levels: int
    codes: int
    dim: int

    def encode(self, x: np.ndarray) -> np.ndarray:
        """float [N, D] -> int64 codes [N, L]."""
        ...

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """int codes [N, L'] with L' <= L (a prefix of the levels) -> float32 [N, D]."""
        ...

    def save(self, directory: Any) -> None:
        """Write the weights / centroids into ``directory``."""
        ...


def default_codes(num_items: int, levels: int = 3) -> int:
    """The automatic codebook size K for a catalogue of ``num_items`` items.

    K is the power of two nearest to 2 * sqrt(I), clipped to [MIN_CODES, MAX_CODES]
    and to I. Reasons:

    * K^2 ~ 4 I: the first two levels alone could address every item about four times
      over, so the last level refines instead of having to separate crowded prefixes,
      and K^L >> I leaves room for new items.
    * The LLM vocabulary stays small (L*K + K_d tokens: ~200 for ml-100k) so each code
      token is seen often in training: ml-100k's 1,682 items over 64 first-level codes
      put ~26 items behind each first token, for the LM to tell apart by the rest.
    * Measured (L=3, seed 0, table in :mod:`codebook.train`): at these sizes every code
      is used and the collision rate before disambiguation is 1.8% (ml-100k, RQ-VAE,
      K=64) and 3.6% (tiktok, K=128). Going to K=256 lowers the reconstruction error
      by ~0.1 of the variance on ml-100k and collisions by < 1 point, but quadruples
      the vocabulary and leaves ~6 items behind each first-level code.

    ml-100k (1,682 items) -> 64, tiktok (6,710) -> 128, a 100-item catalogue -> 16,
    TIGER-sized catalogues (>= ~12k items) -> 256.

    Example::

        default_codes(1682)   # 64
        default_codes(100)    # 16
    """
    if num_items < 1:
        raise ValidationError(f"cannot size a codebook for {num_items} items")
    if levels < 1:
        raise ValidationError(f"levels must be >= 1, got {levels}")
    k = 2 ** round(math.log2(2.0 * math.sqrt(num_items)))
    return int(max(1, min(max(MIN_CODES, min(k, MAX_CODES)), num_items)))


def check_vectors(x: Any, name: str = "item vectors", dim: int | None = None) -> np.ndarray:
    """Array-like or torch tensor -> C-contiguous float32 [N, D], or a ValidationError."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValidationError(f"{name}: expected a non-empty matrix [N, D], got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise ValidationError(f"{name}: expected D={dim} columns, got {arr.shape[1]}")
    if not np.isfinite(arr).all():
        row = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        raise ValidationError(f"{name}: row {row} contains NaN or Inf")
    return arr


def check_codes(codes: Any, levels: int, codes_per_level: int) -> np.ndarray:
    """Array-like -> int64 [N, L'] with 1 <= L' <= levels and values in [0, K)."""
    arr = np.asarray(codes)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or not 1 <= arr.shape[1] <= levels:
        raise ValidationError(
            f"codes: expected shape [N, L'] with 1 <= L' <= {levels}, got {arr.shape}"
        )
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValidationError(f"codes: expected integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= codes_per_level):
        raise ValidationError(
            f"codes: values must lie in [0, {codes_per_level}), got [{arr.min()}, {arr.max()}]"
        )
    return arr


def nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (squared L2; ties -> lowest index).

    Args:
        x: float32 [N, D].
        centroids: float32 [K, D].

    Returns:
        int64 [N].
    """
    x64 = x.astype(np.float64, copy=False)
    c64 = centroids.astype(np.float64, copy=False)
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is constant per row
    dist = (c64 * c64).sum(axis=1)[None, :] - 2.0 * (x64 @ c64.T)  # [N, K]
    return dist.argmin(axis=1).astype(np.int64)


def kmeans(
    x: np.ndarray, k: int, *, seed: int, niter: int = 25, init_centroids: np.ndarray | None = None
) -> np.ndarray:
    """faiss k-means (k-means++ initialisation, no subsampling): float32 [N, D] -> [k, D].

    Deterministic for a given seed (faiss seeds its own RNG; the flat L2 assignment is
    exact). Needs N >= k.
    """
    import faiss

    n, d = x.shape
    if n < k:
        raise ValidationError(
            f"k-means needs at least as many vectors as codes: {n} vectors < K={k}; "
            "use fewer codes (--codes)"
        )
    km = faiss.Kmeans(
        d,
        k,
        niter=niter,
        seed=int(seed) % (2**31),
        min_points_per_centroid=1,  # small catalogues: K up to N is fine, no warning
        max_points_per_centroid=max(256, n // k + 1),  # never subsample
        init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
        verbose=False,
    )
    km.train(np.ascontiguousarray(x, dtype=np.float32), init_centroids=init_centroids)
    return np.asarray(km.centroids, dtype=np.float32).reshape(k, d)


@contextmanager
def limited_threads(threads: int | None) -> Iterator[None]:
    """Run the block with at most ``threads`` torch and faiss (OpenMP) threads, then restore.

    The codebook's matrices are small ([256, 384] batches, [6710, 256] k-means), so
    extra threads buy little and, on a shared machine, cost a lot: measured on the
    2-core project machine under load, one RQ-VAE step took 6 ms with 1 thread and
    870 ms with 2 (OpenMP oversubscription); faiss k-means 0.5 s vs 3.0 s; numpy's
    OpenBLAS (the PCA of RQ-k-means) likewise. None or 0 leaves the settings alone.
    """
    if not threads or threads < 1:
        yield
        return
    import faiss

    try:  # numpy's BLAS (matmul, SVD); threadpoolctl comes with scikit-learn
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - then numpy keeps its own thread count
        threadpool_limits = None
    torch = sys.modules.get("torch")  # only touch torch if something already imported it
    old_faiss = faiss.omp_get_max_threads()
    old_torch = torch.get_num_threads() if torch is not None else None
    faiss.omp_set_num_threads(threads)
    if torch is not None:
        torch.set_num_threads(threads)
    try:
        if threadpool_limits is not None:
            with threadpool_limits(limits=threads):
                yield
        else:  # pragma: no cover
            yield
    finally:
        faiss.omp_set_num_threads(old_faiss)
        if torch is not None and old_torch is not None:
            torch.set_num_threads(old_torch)


def relative_mse(x: np.ndarray, x_hat: np.ndarray) -> float:
    """||X - X_hat||_F^2 / ||X||_F^2 (0 = perfect; 1 = as bad as predicting zeros)."""
    num = float(((x.astype(np.float64) - x_hat.astype(np.float64)) ** 2).sum())
    den = float((x.astype(np.float64) ** 2).sum())
    return num / den if den > 0 else 0.0
