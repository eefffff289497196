"""The canonical dataset: one in-memory type and one on-disk directory format.

Every loader converts its source into a :class:`Dataset`; :func:`write_dataset` and
:func:`read_dataset` move it to and from a *canonical dataset directory*::

    DIR/
      interactions.csv      user_id,item_id,timestamp[,rating]   (header row required)
      items.jsonl           one JSON object per line: {"item_id": ..., <any text fields>}
      features/<name>.npy   optional float matrix [I, D], row i = line i of items.jsonl
      dataset.json          optional metadata (name, source, notes); written by `data prepare`

Ids are strings; ``timestamp`` is an integer (unix seconds, or any monotone integer
clock such as a list position). Item order is the order of ``items.jsonl``: item index
``i`` everywhere in the project means row ``i`` of ``Dataset.items``.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recsys.data.atomic import replace_dir
from recsys.errors import DataFormatError, DatasetNotFoundError

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
OPTIONAL_INTERACTION_COLUMNS = ("rating",)


@dataclass
class Dataset:
    """A dataset in canonical form, with integer encodings derived on first use.

    Attributes:
        name: short name (``ml-100k``).
        items: DataFrame, column ``item_id`` (str, unique) plus any text columns; row i is item i.
        interactions: DataFrame with ``user_id`` (str), ``item_id`` (str), ``timestamp``
            (int64) and optionally ``rating`` (float64), sorted stably by timestamp.
        features: modality name -> float32 array [I, D_m] aligned with ``items``.
        info: free-form provenance (source files, join reports, ...), saved as dataset.json.

    Example::

        ds = read_dataset("~/.cache/recsys-llm-edit/datasets/ml-100k")
        ds.num_users, ds.num_items, len(ds.interactions)   # (943, 1682, 100000)
        ds.item_index[:3]                                   # int64 item indices [N]
    """

    name: str
    items: pd.DataFrame
    interactions: pd.DataFrame
    features: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Not a validator (so not a pydantic config dataclass): a Dataset holds DataFrames
        # and caches encodings; this only puts the interactions in time order. The
        # checks are :meth:`validate`, whose DataFormatError names the file and the row.
        self.interactions = self.interactions.sort_values("timestamp", kind="stable").reset_index(
            drop=True
        )

    # ---- encodings -------------------------------------------------------------------
    @cached_property
    def item_ids(self) -> np.ndarray:
        """Item ids in index order, object array [I]."""
        return self.items["item_id"].to_numpy(dtype=object)

    @cached_property
    def user_ids(self) -> np.ndarray:
        """Sorted unique user ids, object array [U]; user index u is ``user_ids[u]``."""
        return np.asarray(sorted(self.interactions["user_id"].unique()), dtype=object)

    @cached_property
    def item_index(self) -> np.ndarray:
        """Item index of every interaction, int64 [N]."""
        lookup = pd.Index(self.items["item_id"])
        idx = lookup.get_indexer(self.interactions["item_id"])
        if (idx < 0).any():  # guarded at construction by validate(); kept as a last check
            raise DataFormatError(self.name, None, "interactions refer to unknown item ids")
        return idx.astype(np.int64)

    @cached_property
    def user_index(self) -> np.ndarray:
        """User index of every interaction, int64 [N]."""
        return pd.Index(self.user_ids).get_indexer(self.interactions["user_id"]).astype(np.int64)

    @cached_property
    def timestamps(self) -> np.ndarray:
        """Timestamp of every interaction, int64 [N] (non-decreasing)."""
        return self.interactions["timestamp"].to_numpy(dtype=np.int64)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.items)

    def fingerprint(self) -> str:
        """A short content hash of interactions and item ids (recorded in checkpoints)."""
        import hashlib

        h = hashlib.sha256()
        h.update("\x1f".join(self.item_ids).encode())
        h.update(np.ascontiguousarray(self.user_index).tobytes())
        h.update(np.ascontiguousarray(self.item_index).tobytes())
        h.update(np.ascontiguousarray(self.timestamps).tobytes())
        return h.hexdigest()[:16]

    def validate(self, source: str | Path | None = None) -> None:
        """Check cross-table consistency; raise :class:`DataFormatError` naming the row."""
        where = str(source or self.name)
        _check_items(self.items, Path(where) / "items.jsonl" if source else where)
        _check_interactions(
            self.interactions,
            set(self.items["item_id"]),
            Path(where) / "interactions.csv" if source else where,
            line_offset=2,
        )
        for modality, matrix in self.features.items():
            _check_feature(matrix, modality, self.num_items, where)


# ---- validation helpers --------------------------------------------------------------
def _check_items(items: pd.DataFrame, path: str | Path) -> None:
    if "item_id" not in items.columns:
        raise DataFormatError(path, None, "missing column 'item_id'")
    dup = items["item_id"].duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise DataFormatError(
            path, row + 1, f"duplicate item_id {items['item_id'].iloc[row]!r}; ids must be unique"
        )


def _check_interactions(
    inter: pd.DataFrame, known_items: set[str], path: str | Path, line_offset: int
) -> None:
    """``line_offset`` maps a 0-based row to a file line (2 for a CSV with a header)."""
    missing = [c for c in INTERACTION_COLUMNS if c not in inter.columns]
    if missing:
        raise DataFormatError(
            path,
            1,
            f"missing column(s) {', '.join(missing)}; the header must name "
            f"{', '.join(INTERACTION_COLUMNS)} (optionally rating)",
        )
    for col in ("user_id", "item_id"):
        empty = inter[col].isna() | (inter[col].astype(str).str.len() == 0)
        if empty.any():
            row = int(np.flatnonzero(empty.to_numpy())[0])
            raise DataFormatError(path, row + line_offset, f"empty {col}")
    unknown = ~inter["item_id"].isin(known_items)
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise DataFormatError(
            path,
            row + line_offset,
            f"unknown item_id {inter['item_id'].iloc[row]!r} (not in items.jsonl); "
            f"{int(unknown.sum())} interaction(s) refer to unknown items",
        )


def _check_feature(matrix: np.ndarray, modality: str, num_items: int, where: str) -> None:
    path = Path(where) / "features" / f"{modality}.npy"
    if matrix.ndim != 2 or matrix.shape[0] != num_items:
        raise DataFormatError(
            path, None, f"shape {tuple(matrix.shape)} does not match [num_items={num_items}, D]"
        )
    if not np.isfinite(matrix).all():
        row = int(np.flatnonzero(~np.isfinite(matrix).all(axis=1))[0])
        raise DataFormatError(path, None, f"row {row} contains NaN or Inf")


def parse_timestamps(raw: pd.Series, path: str | Path, line_offset: int) -> np.ndarray:
    """Strings -> int64 timestamps, or a :class:`DataFormatError` naming the first bad line."""
    numeric = pd.to_numeric(raw, errors="coerce")
    bad = numeric.isna() | (numeric != np.floor(numeric))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataFormatError(
            path,
            row + line_offset,
            f"timestamp {raw.iloc[row]!r} is not an integer (expected unix seconds or an "
            "integer position)",
        )
    return numeric.to_numpy().astype(np.int64)


# ---- reading -------------------------------------------------------------------------
def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(1-based line number, object)`` for every non-blank line of a JSON-lines file; a
    line that is not a JSON object is a :class:`DataFormatError` naming the line."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(path, lineno, f"invalid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise DataFormatError(path, lineno, "expected a JSON object per line")
            yield lineno, rec


def read_items_jsonl(path: Path) -> pd.DataFrame:
    """Parse items.jsonl line by line so a bad line is reported with its number."""
    records: list[dict[str, Any]] = []
    for lineno, rec in iter_jsonl(path):
        if "item_id" not in rec or rec["item_id"] in (None, ""):
            raise DataFormatError(path, lineno, "missing 'item_id'")
        rec["item_id"] = str(rec["item_id"])
        records.append(rec)
    if not records:
        raise DataFormatError(path, None, "no items")
    items = pd.DataFrame.from_records(records)
    cols = ["item_id"] + [c for c in items.columns if c != "item_id"]
    items = items[cols]
    for col in items.columns[1:]:
        # a whole-number column with gaps arrives as float (1995.0); keep it integral
        values = items[col]
        if values.dtype.kind == "f" and np.all(np.mod(values.dropna(), 1) == 0):
            items[col] = values.astype("Int64")
    _check_items(items, path)
    return items


def read_interactions_csv(path: Path, known_items: set[str]) -> pd.DataFrame:
    """Parse interactions.csv (header required); every problem names its line."""
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.ParserError as exc:
        raise DataFormatError(path, None, f"not a valid CSV file ({exc})") from None
    except pd.errors.EmptyDataError:
        raise DataFormatError(path, None, "the file is empty; expected a header row") from None
    raw.columns = [c.strip() for c in raw.columns]
    _check_interactions(raw, known_items, path, line_offset=2)
    out = pd.DataFrame(
        {
            "user_id": raw["user_id"].astype(str),
            "item_id": raw["item_id"].astype(str),
            "timestamp": parse_timestamps(raw["timestamp"], path, 2),
        }
    )
    if "rating" in raw.columns:
        rating = pd.to_numeric(raw["rating"], errors="coerce")
        bad = rating.isna() & (raw["rating"].str.len() > 0)
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataFormatError(
                path, row + 2, f"rating {raw['rating'].iloc[row]!r} is not a number"
            )
        out["rating"] = rating.astype(np.float64)
    if out.empty:
        raise DataFormatError(path, None, "no interactions")
    return out


def read_dataset(path: str | Path, *, with_features: bool = True) -> Dataset:
    """Load a canonical dataset directory (see the module docstring)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"{root} is not a directory; run `recsys data prepare NAME` or point to a "
            "canonical dataset directory (interactions.csv + items.jsonl)"
        )
    for required in ("interactions.csv", "items.jsonl"):
        if not (root / required).is_file():
            raise DatasetNotFoundError(f"{root} has no {required}; it is not a canonical dataset")
    info: dict[str, Any] = {}
    if (root / "dataset.json").is_file():
        try:
            info = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataFormatError(
                root / "dataset.json", exc.lineno, f"invalid JSON ({exc.msg})"
            ) from None
    items = read_items_jsonl(root / "items.jsonl")
    inter = read_interactions_csv(root / "interactions.csv", set(items["item_id"]))
    features: dict[str, np.ndarray] = {}
    if with_features and (root / "features").is_dir():
        for npy in sorted((root / "features").glob("*.npy")):
            try:
                matrix = np.load(npy, allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise DataFormatError(npy, None, f"not a readable .npy array ({exc})") from None
            _check_feature(matrix, npy.stem, len(items), str(root))
            features[npy.stem] = matrix.astype(np.float32, copy=False)
    name = str(info.get("name") or root.name)
    return Dataset(name=name, items=items, interactions=inter, features=features, info=info)


# ---- writing -------------------------------------------------------------------------
def _is_missing(value: Any) -> bool:
    """None, NaN or pandas' NA (a gap in an item's text fields): not written."""
    return value is None or (np.isscalar(value) and bool(pd.isna(value)))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_dataset(ds: Dataset, path: str | Path) -> Path:
    """Write ``ds`` as a canonical directory, atomically (a crash leaves the old one)."""
    ds.validate()
    dest = Path(path).expanduser()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; a dataset is not a secret
    try:
        cols = list(INTERACTION_COLUMNS) + [
            c for c in OPTIONAL_INTERACTION_COLUMNS if c in ds.interactions.columns
        ]
        ds.interactions[cols].to_csv(tmp / "interactions.csv", index=False)
        with open(tmp / "items.jsonl", "w", encoding="utf-8") as fh:
            for rec in ds.items.to_dict(orient="records"):
                clean = {k: v for k, v in rec.items() if not _is_missing(v)}
                fh.write(json.dumps(clean, ensure_ascii=False, default=_json_default) + "\n")
        if ds.features:
            (tmp / "features").mkdir()
            for modality, matrix in ds.features.items():
                np.save(tmp / "features" / f"{modality}.npy", np.asarray(matrix, dtype=np.float32))
        info = {"name": ds.name, **ds.info}
        (tmp / "dataset.json").write_text(
            json.dumps(info, indent=2, default=_json_default) + "\n", encoding="utf-8"
        )
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
