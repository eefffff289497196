"""Fused item feature matrix: one row per item, one column block per modality.

Fusion of modalities m = 1..M with raw matrices X_m [I, D_m] and weights w_m::

    B_m[i] = w_m * X_m[i] / ||X_m[i]||      (0 when item i lacks modality m)
    F[i]   = concat_m B_m[i] / ||concat_m B_m[i]||        F: [I, sum_m D_m]

Per-row L2 normalisation first removes each modality's scale (raw TikTok visual
features have norms in the tens, MiniLM vectors norm 1), so a modality's share of a
dot product between two fully covered items is w_m^2 / sum_m w_m^2: equal by default.
A row "lacks" a modality when its raw vector is (numerically) zero; it stays zero in
that block, and :attr:`ItemFeatures.coverage` reports the fraction of rows that have it.

Saved as ``DIR/item_features.npz`` (matrix, item ids) + ``DIR/item_features.json``
(layout, coverage, weights, stats), both written atomically.

Example::

    feats = build_item_features(ds)                   # text (+ image, audio if present)
    feats.matrix.shape, feats.layout                  # (I, 384), {'text': (0, 384)}
    feats.block("text")                               # [I, 384] view of the text columns
    feats.save(out_dir); ItemFeatures.load(out_dir)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from recsys.data.atomic import atomic_write
from recsys.errors import DataFormatError, ValidationError

if TYPE_CHECKING:
    from recsys.data.canonical import Dataset
    from recsys.features.text import TextEncoder

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MATRIX_FILE = "item_features.npz"
LAYOUT_FILE = "item_features.json"
MISSING_EPS = 1e-12  # a raw row with norm below this counts as "modality absent"


@dataclass
class ItemFeatures:
    """A fused item feature matrix and how to read it.

    Attributes:
        matrix: float32 [I, D], rows unit-norm (zero for an item with no modality at all).
        layout: modality -> (start, end) column slice of ``matrix``, in block order.
        coverage: modality -> fraction of items that have it, in [0, 1].
        weights: modality -> block weight w_m used in the fusion.
        item_ids: [I] item ids (str), to check alignment with a dataset.
        stats: modality -> figures for reports (raw_dim, raw_mean_norm, from_cache, ...).
        info: provenance (dataset name and fingerprint), saved with the matrix.
    """

    matrix: np.ndarray
    layout: dict[str, tuple[int, int]]
    coverage: dict[str, float]
    weights: dict[str, float]
    item_ids: np.ndarray
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    @property
    def modalities(self) -> list[str]:
        return list(self.layout)

    def block(self, modality: str) -> np.ndarray:
        """The columns of one modality: [I, D_m] view."""
        if modality not in self.layout:
            raise ValidationError(f"no modality {modality!r}; have {', '.join(self.layout)}")
        start, end = self.layout[modality]
        return self.matrix[:, start:end]

    def present(self, modality: str) -> np.ndarray:
        """bool [I]: which items have this modality (non-zero block)."""
        return np.linalg.norm(self.block(modality), axis=1) > MISSING_EPS

    # ---- persistence -----------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``item_features.npz`` + ``item_features.json`` into ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(
            out / MATRIX_FILE,
            lambda fh: np.savez(fh, matrix=self.matrix, item_ids=self.item_ids.astype(str)),
        )
        meta = {
            "format_version": FORMAT_VERSION,
            "num_items": self.num_items,
            "dim": self.dim,
            "layout": {m: list(s) for m, s in self.layout.items()},
            "coverage": self.coverage,
            "weights": self.weights,
            "stats": self.stats,
            "info": self.info,
        }
        payload = (json.dumps(meta, indent=2, default=_jsonable) + "\n").encode("utf-8")
        atomic_write(out / LAYOUT_FILE, lambda fh: fh.write(payload))
        logger.info("saved item features [%d, %d] to %s", self.num_items, self.dim, out)
        return out

    @classmethod
    def load(cls, directory: str | Path) -> ItemFeatures:
        """Read what :meth:`save` wrote; a :class:`DataFormatError` names a bad file."""
        root = Path(directory)
        meta_path, npz_path = root / LAYOUT_FILE, root / MATRIX_FILE
        for path in (meta_path, npz_path):
            if not path.is_file():
                raise DataFormatError(path, None, "missing; run `recsys features build` first")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataFormatError(meta_path, exc.lineno, f"invalid JSON ({exc.msg})") from None
        try:
            with np.load(npz_path, allow_pickle=False) as npz:
                matrix = np.asarray(npz["matrix"], dtype=np.float32)
                item_ids = np.asarray(npz["item_ids"]).astype(str).astype(object)
        except (OSError, ValueError, KeyError) as exc:
            raise DataFormatError(npz_path, None, f"unreadable ({exc}); rebuild it") from None
        layout = {m: (int(s[0]), int(s[1])) for m, s in meta.get("layout", {}).items()}
        if matrix.ndim != 2 or len(item_ids) != len(matrix):
            raise DataFormatError(
                npz_path, None, f"matrix {matrix.shape} / item ids {item_ids.shape}"
            )
        if layout and max(e for _, e in layout.values()) != matrix.shape[1]:
            raise DataFormatError(
                meta_path, None, f"layout {layout} does not match matrix width {matrix.shape[1]}"
            )
        return cls(
            matrix=matrix,
            layout=layout,
            coverage={m: float(v) for m, v in meta.get("coverage", {}).items()},
            weights={m: float(v) for m, v in meta.get("weights", {}).items()},
            item_ids=item_ids,
            stats=meta.get("stats", {}),
            info=meta.get("info", {}),
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _as_matrix(value: Any, name: str, num_items: int) -> np.ndarray:
    """Array-like or torch tensor -> float32 [I, D], validated."""
    if hasattr(value, "detach"):  # torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    matrix = np.asarray(value, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[0] != num_items:
        raise ValidationError(
            f"modality {name!r}: expected a matrix [I={num_items}, D], got {tuple(matrix.shape)}"
        )
    if not np.isfinite(matrix).all():
        row = int(np.flatnonzero(~np.isfinite(matrix).all(axis=1))[0])
        raise ValidationError(f"modality {name!r}: row {row} contains NaN or Inf")
    return matrix


def fuse(
    blocks: dict[str, Any],
    item_ids: Any,
    weights: dict[str, float] | None = None,
    stats: dict[str, dict[str, Any]] | None = None,
) -> ItemFeatures:
    """Fuse raw modality matrices {name: [I, D_m]} into :class:`ItemFeatures`.

    Args:
        blocks: modality -> raw matrix [I, D_m] (numpy or torch), in block order.
        item_ids: [I] item ids.
        weights: modality -> w_m >= 0 (default 1.0 each: equal shares).
        stats: extra per-modality figures to keep (e.g. text cache counts).

    Returns:
        ItemFeatures with float32 matrix [I, sum_m D_m].
    """
    ids = np.asarray(item_ids, dtype=object)
    num_items = len(ids)
    if not blocks:
        raise ValidationError("no modality to fuse; give at least one feature matrix")
    weights = dict(weights or {})
    unknown = set(weights) - set(blocks)
    if unknown:
        raise ValidationError(
            f"weights for unknown modalities {sorted(unknown)}; modalities are {list(blocks)}"
        )
    for name, w in weights.items():
        if not np.isfinite(w) or w < 0:
            raise ValidationError(f"weight of {name!r} must be a finite number >= 0, got {w}")
    parts: list[np.ndarray] = []
    layout: dict[str, tuple[int, int]] = {}
    coverage: dict[str, float] = {}
    used_weights: dict[str, float] = {}
    all_stats: dict[str, dict[str, Any]] = {}
    col = 0
    for name, raw in blocks.items():
        x = _as_matrix(raw, name, num_items)  # [I, D_m]
        norms = np.linalg.norm(x.astype(np.float64), axis=1)  # [I]
        present = norms > MISSING_EPS
        w = float(weights.get(name, 1.0))
        block = np.zeros_like(x)
        block[present] = x[present] / norms[present, None].astype(np.float32) * w
        parts.append(block)
        layout[name] = (col, col + x.shape[1])
        col += x.shape[1]
        coverage[name] = float(present.mean()) if num_items else 0.0
        used_weights[name] = w
        all_stats[name] = {
            "raw_dim": int(x.shape[1]),
            "raw_mean_norm": float(norms[present].mean()) if present.any() else 0.0,
            "missing": int((~present).sum()),
            **(stats or {}).get(name, {}),
        }
    fused = np.concatenate(parts, axis=1)  # [I, D]
    row_norm = np.linalg.norm(fused, axis=1, keepdims=True)  # [I, 1]
    np.divide(fused, row_norm, out=fused, where=row_norm > MISSING_EPS)
    empty = int((row_norm[:, 0] <= MISSING_EPS).sum())
    if empty:
        logger.warning(
            "%d of %d items have no feature in any modality (zero rows)", empty, num_items
        )
    return ItemFeatures(
        matrix=fused.astype(np.float32, copy=False),
        layout=layout,
        coverage=coverage,
        weights=used_weights,
        item_ids=ids,
        stats=all_stats,
    )


def text_columns_of(ds: Dataset) -> list[str]:
    """The item columns that feed the text modality: the loader's declared
    ``ds.info["text_columns"]`` when present, else every column the template would use
    (see :func:`recsys.features.text.text_columns`)."""
    from recsys.features.text import text_columns

    declared = ds.info.get("text_columns")
    if isinstance(declared, list):
        return [c for c in declared if c in ds.items.columns and c != "item_id"]
    return [c for _, cols in text_columns(ds.items) for c in cols]


def available_modalities(ds: Dataset, collaborative: Any | None = None) -> list[str]:
    """Modalities :func:`build_item_features` can use for ``ds``, in block order."""
    names = []
    if "text" in ds.features or text_columns_of(ds):
        names.append("text")
    names += [m for m in ds.features if m != "text"]
    if collaborative is not None:
        if "collaborative" in ds.features:
            raise ValidationError(
                f"{ds.name} already has a 'collaborative' feature matrix; do not pass another"
            )
        names.append("collaborative")
    return names


def build_item_features(
    ds: Dataset,
    cache_dir: str | Path | None = None,
    modalities: list[str] | None = None,
    collaborative: Any | None = None,
    *,
    weights: dict[str, float] | None = None,
    encoder: TextEncoder | None = None,
    progress: bool = True,
) -> ItemFeatures:
    """Fused features of a dataset's items: text embeddings + ``ds.features`` + collaborative.

    Args:
        ds: the dataset; its text columns (:func:`text_columns_of`) feed the text
            modality (unless ``ds.features`` already holds a "text" matrix, used as
            given); every ``ds.features`` matrix [I, D_m] is a modality of its own.
        cache_dir: project cache folder (text embeddings go to ``<it>/embeddings``);
            default :func:`recsys.settings.cache_dir`.
        modalities: subset to use, in this order; default all available.
        collaborative: optional [I, D_c] matrix (e.g. the ranker's item embeddings),
            numpy or torch, added as modality "collaborative".
        weights: modality -> w_m (default 1.0 each).
        encoder: text encoder (default all-MiniLM-L6-v2 on the CPU).
        progress: show a progress bar while encoding.

    Returns:
        ItemFeatures aligned with ``ds.items``.
    """
    from recsys import settings
    from recsys.features.text import text_features

    available = available_modalities(ds, collaborative)
    chosen = list(modalities) if modalities else available
    missing = [m for m in chosen if m not in available]
    if missing:
        raise ValidationError(
            f"modalities {missing} are not available for {ds.name}; available: {available}"
        )
    blocks: dict[str, Any] = {}
    stats: dict[str, dict[str, Any]] = {}
    for name in chosen:
        if name == "text" and "text" not in ds.features:
            root = settings.cache_dir(cache_dir) / "embeddings"
            items = ds.items[["item_id", *text_columns_of(ds)]]
            blocks[name], text_stats = text_features(
                items, cache_root=root, encoder=encoder, progress=progress
            )
            stats[name] = text_stats.to_dict()
        elif name == "collaborative":
            blocks[name] = collaborative
        else:
            blocks[name] = ds.features[name]
    features = fuse(blocks, ds.item_ids, weights=weights, stats=stats)
    features.info = {"dataset": ds.name, "fingerprint": ds.fingerprint()}
    return features


def features_dir(name_or_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Where ``recsys features build`` saves a dataset's features by default.

    A canonical dataset directory given by path keeps them beside its files
    (``DIR/item_features.npz``); a named dataset under ``cache_dir()/features/NAME``.
    """
    from recsys import settings

    path = Path(name_or_path).expanduser()
    if (path / "items.jsonl").is_file():
        return path
    return settings.cache_dir(cache_dir) / "features" / str(name_or_path)


def summarise(features: ItemFeatures) -> list[dict[str, Any]]:
    """One row per modality plus a ``fused`` row, for tables and the demo.

    Columns: modality, dim, coverage (fraction of items), mean_norm (raw vectors, items
    that have the modality), weight, share (mean fraction of a fused row's squared norm
    in this block), from_cache / encoded (text only, else None).
    """
    sq = features.matrix.astype(np.float64) ** 2  # [I, D]
    total = sq.sum(axis=1)  # [I]
    nonzero = total > 0
    rows = []
    for name, (start, end) in features.layout.items():
        st = features.stats.get(name, {})
        share = (
            sq[nonzero, start:end].sum(axis=1) / total[nonzero] if nonzero.any() else np.zeros(1)
        )
        rows.append(
            {
                "modality": name,
                "dim": end - start,
                "coverage": features.coverage.get(name, 0.0),
                "mean_norm": float(st.get("raw_mean_norm", float("nan"))),
                "weight": features.weights.get(name, 1.0),
                "share": float(share.mean()),
                "from_cache": st.get("from_cache"),
                "encoded": st.get("encoded"),
            }
        )
    fused_norm = np.sqrt(total)
    rows.append(
        {
            "modality": "fused",
            "dim": features.dim,
            "coverage": float(nonzero.mean()) if len(nonzero) else 0.0,
            "mean_norm": float(fused_norm[nonzero].mean()) if nonzero.any() else 0.0,
            "weight": None,
            "share": 1.0 if nonzero.any() else 0.0,
            "from_cache": None,
            "encoded": None,
        }
    )
    return rows
