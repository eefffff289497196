"""The LM's generated tokens cached on disk, so an offline run pays for a window once.

A pretrained LLM's constrained search is the dominant cost of training an adaptor on
its tokens and of replaying it (SmolLM2-135M: ~57 GFLOP, about a second of one CPU core,
per window). The answer depends only on the model, the search settings and the
uplinked window, so :class:`CachedTokens` keeps every answer it computes:

    key(window)   = sha256(identity, N, window item ids as int64)
    value(window) = [items (N) | scores (N)] as float32 [2N]        (items exact < 2^24)

in an :class:`~recsys.features.cache.EmbeddingCache` (atomic shards, a damaged shard is
dropped and recomputed). Each call's new answers are written before it returns, so an
interrupted run resumes where it stopped, and a later run on the same windows (another
adaptor arm, the replay of the same stream) generates nothing.

``identity`` is :func:`lm_identity`: the backend name and settings and a sha256 of every
file of the model directory, so a retrained or re-aligned model never reads another
model's answers. Only offline work (adaptor training, replay) caches; the cloud server
always generates.

Example::

    tokens = CachedTokens(LMTokens(backend, 20), lm_dir / "token-cache", lm_identity(lm_dir, "transformers", cfg))
    items, scores = tokens(windows)   # int64 [B, N] (-1 padded), float32 [B, N]
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from recsys.adaptor_inputs import TokenSource
from recsys.errors import ValidationError
from recsys.features.cache import EmbeddingCache

logger = logging.getLogger(__name__)

EXACT_FLOAT32_IDS = 1 << 24  # every integer below this is exact in float32
CACHE_FOLDER = "token-cache"  # inside the LM directory


def lm_identity(lm_dir: Path, backend: str, settings: object) -> str:
    """What decides an LM's answers: backend name, its settings' repr and the sha256 of
    every file directly in ``lm_dir`` (weights, tokenizer, trie, ``recsys_lm.json``)."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(lm_dir).iterdir() if p.is_file()):
        h.update(path.name.encode())
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return f"lm-tokens|{backend}|{settings!r}|{h.hexdigest()}"


class CachedTokens:
    """A token source whose answers are read from, and written to, a disk cache.

    Args:
        source: the token source computing answers on a miss (``LMTokens``).
        root: folder of the cache (one sub-folder per identity).
        identity: :func:`lm_identity` of the source's model and settings.
    """

    def __init__(self, source: TokenSource, root: Path, identity: str) -> None:
        self.source = source
        self.name = source.name
        self.n = source.n
        self.identity = identity
        self.store = EmbeddingCache(root, f"{identity}|n={self.n}")  # rows are [2N]
        self.hits = 0
        self.misses = 0

    def _key(self, window: np.ndarray) -> str:
        h = hashlib.sha256(f"{self.identity}|{self.n}|".encode())
        h.update(np.ascontiguousarray(window, dtype=np.int64).tobytes())
        return h.hexdigest()

    def __call__(self, windows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """Windows -> (items int64 [B, N], -1 padded; scores float32 [B, N])."""
        keys = [self._key(w) for w in windows]
        found = self.store.get(keys)  # {key: float32 [2N]}
        items = np.full((len(windows), self.n), -1, dtype=np.int64)
        scores = np.zeros((len(windows), self.n), dtype=np.float32)
        missing = [b for b, k in enumerate(keys) if k not in found]
        hit = [b for b, k in enumerate(keys) if k in found]
        if hit:
            rows = np.stack([found[keys[b]] for b in hit])  # [H, 2N]
            items[hit] = rows[:, : self.n].astype(np.int64)
            scores[hit] = rows[:, self.n :]
        if missing:
            new_items, new_scores = self.source([windows[b] for b in missing])
            if new_scores is None:
                new_scores = np.zeros(new_items.shape, dtype=np.float32)
            if new_items.size and int(new_items.max()) >= EXACT_FLOAT32_IDS:
                raise ValidationError(
                    f"item id {int(new_items.max())} is too large for the token cache "
                    f"(float32 is exact below {EXACT_FLOAT32_IDS:,}); run without the cache"
                )
            items[missing], scores[missing] = new_items, new_scores
            values = np.concatenate([new_items.astype(np.float32), new_scores], axis=1)
            self.store.put([keys[b] for b in missing], values)
        self.hits += len(hit)
        self.misses += len(missing)
        return items, scores

    def close(self) -> None:
        if self.hits or self.misses:
            logger.info(
                "LM token cache %s: %d windows read, %d generated",
                self.store.path,
                self.hits,
                self.misses,
            )
        self.store.compact()
        self.source.close()


__all__ = ["CACHE_FOLDER", "CachedTokens", "lm_identity"]
