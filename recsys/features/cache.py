"""A content-addressed on-disk store of embedding vectors.

One store per model identity, in ``ROOT/<model-slug>/``. Each write adds one *shard*
(``shard-*.npz`` with ``keys`` [N] and ``vectors`` [N, D] float32), written to a
temporary file and moved into place with :func:`os.replace`, so a reader never sees a
half-written shard and concurrent writers never overwrite each other. When shards pile
up (or when the caller calls :meth:`EmbeddingCache.compact`) they are merged into one,
again atomically; the old shards are removed after.

A shard that cannot be read (truncated, garbage, wrong shapes, non-finite values) is
logged as a warning and deleted; its entries are simply missing, so the caller
re-encodes them. Nothing in the cache is ever trusted over a recomputation.

Example::

    store = EmbeddingCache(cache_dir() / "embeddings", "my-model@1")
    found = store.get(["k1", "k2"])            # {key: float32 [D]} for keys present
    store.put(["k3"], np.ones((1, 8), np.float32))
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import time
import uuid
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from recsys.errors import ValidationError

logger = logging.getLogger(__name__)

MAX_SHARDS = 8  # put() compacts past this many shards (callers may compact() at the end)
STALE_TMP_SECONDS = 3600  # temporary files older than this are leftovers of a crash


def text_key(model_id: str, text: str) -> str:
    """sha256 hex digest of (model identity, text): the cache key of one embedding."""
    h = hashlib.sha256()
    h.update(model_id.encode("utf-8"))
    h.update(b"\x00")
    h.update(text.encode("utf-8"))
    return h.hexdigest()


def _slug(model_id: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id)[:48].strip("_") or "model"
    return f"{readable}-{hashlib.sha256(model_id.encode()).hexdigest()[:10]}"


class EmbeddingCache:
    """Vectors by string key for one model identity (see the module docstring).

    Args:
        root: folder holding one sub-folder per model (``cache_dir()/embeddings``).
        model_id: identity of the model; part of the folder name.
    """

    def __init__(self, root: str | Path, model_id: str) -> None:
        self.model_id = model_id
        self.path = Path(root) / _slug(model_id)
        self._keys: dict[str, int] = {}
        self._vectors = np.zeros((0, 0), dtype=np.float32)  # [N, D]
        self._loaded = False

    # ---- reading ---------------------------------------------------------------------
    def _shards(self) -> list[Path]:
        return sorted(self.path.glob("shard-*.npz"))

    def _read_shard(self, shard: Path) -> tuple[np.ndarray, np.ndarray] | None:
        """(keys [N], vectors [N, D]) or None after removing a corrupt shard."""
        try:
            with np.load(shard, allow_pickle=False) as npz:
                keys = np.asarray(npz["keys"]).astype(str)
                vectors = np.asarray(npz["vectors"], dtype=np.float32)
            if keys.ndim != 1 or vectors.ndim != 2 or len(keys) != len(vectors):
                raise ValueError(f"shapes keys {keys.shape} / vectors {vectors.shape} disagree")
            if not np.isfinite(vectors).all():
                raise ValueError("non-finite values")
        except FileNotFoundError:  # compacted away by another process meanwhile
            return None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            logger.warning(
                "embedding cache file %s is unreadable (%s); removing it, its entries "
                "will be recomputed",
                shard,
                exc,
            )
            shard.unlink(missing_ok=True)
            return None
        return keys, vectors

    def load(self) -> int:
        """Read every shard into memory; returns the number of cached vectors."""
        all_keys: list[np.ndarray] = []
        all_vecs: list[np.ndarray] = []
        dim: int | None = None
        for shard in self._shards():
            read = self._read_shard(shard)
            if read is None:
                continue
            keys, vectors = read
            if dim is not None and vectors.shape[1] != dim:
                logger.warning(
                    "embedding cache file %s has dimension %d, others %d; removing it",
                    shard,
                    vectors.shape[1],
                    dim,
                )
                shard.unlink(missing_ok=True)
                continue
            dim = vectors.shape[1]
            all_keys.append(keys)
            all_vecs.append(vectors)
        self._keys = {}
        if all_vecs:
            self._vectors = np.concatenate(all_vecs)
            for row, key in enumerate(np.concatenate(all_keys).tolist()):
                self._keys[key] = row  # a later duplicate wins; duplicates are identical
        else:
            self._vectors = np.zeros((0, 0), dtype=np.float32)
        self._loaded = True
        return len(self._keys)

    @property
    def dim(self) -> int | None:
        """Vector dimension of the cached entries (None while empty)."""
        if not self._loaded:
            self.load()
        return int(self._vectors.shape[1]) if self._keys else None

    def __len__(self) -> int:
        if not self._loaded:
            self.load()
        return len(self._keys)

    def get(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """Cached vectors for the keys present: {key: float32 [D]}."""
        if not self._loaded:
            self.load()
        return {k: self._vectors[self._keys[k]] for k in keys if k in self._keys}

    # ---- writing ---------------------------------------------------------------------
    def put(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        """Add ``vectors`` [N, D] under ``keys`` [N] as one new shard (atomic)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(keys) != len(vectors):
            raise ValidationError(
                f"expected N keys and vectors [N, D], got {len(keys)} and {vectors.shape}"
            )
        if not len(keys):
            return
        if self.dim is not None and vectors.shape[1] != self.dim:
            raise ValidationError(
                f"vectors have dimension {vectors.shape[1]} but the cache at {self.path} "
                f"holds dimension {self.dim}; use another model identity"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        self._write_shard(np.asarray(keys, dtype=str), vectors)
        start = len(self._vectors) if self._keys else 0
        self._vectors = (
            vectors.copy() if not self._keys else np.concatenate([self._vectors, vectors])
        )
        for offset, key in enumerate(keys):
            self._keys[key] = start + offset
        self.compact(MAX_SHARDS)

    def _write_shard(self, keys: np.ndarray, vectors: np.ndarray) -> Path:
        name = f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.npz"
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=self.path)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, keys=keys, vectors=vectors)
                fh.flush()
                os.fsync(fh.fileno())
            dest = self.path / name
            os.replace(tmp_name, dest)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return dest

    def compact(self, max_shards: int = 1) -> None:
        """Merge the shards into one when there are more than ``max_shards``."""
        shards = self._shards()
        if len(shards) <= max_shards:
            return
        self.load()  # re-read from disk: also picks up other writers' shards
        keys = sorted(self._keys)
        rows = np.asarray([self._keys[k] for k in keys], dtype=np.int64)
        merged = self._write_shard(np.asarray(keys, dtype=str), self._vectors[rows])
        for shard in shards:
            if shard != merged:
                shard.unlink(missing_ok=True)
        self._cleanup_tmp()
        logger.info("compacted %d embedding cache shards into %s", len(shards), merged.name)

    def _cleanup_tmp(self) -> None:
        cutoff = time.time() - STALE_TMP_SECONDS
        for tmp in self.path.glob(".tmp-*"):
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
            except FileNotFoundError:
                continue
