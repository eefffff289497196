"""Amazon review datasets in the LC-Rec JSON format (e.g. ``amazon-scientific``).

Source files in the dataset folder (``PREFIX`` is ``Scientific`` for Industrial &
Scientific):

* ``PREFIX.inter.json``: ``{user: [item, item, ...]}``, each list in time order (5-core).
* ``PREFIX.item.json``: ``{item: {"title", "description", "brand", "categories"}}``.

There are no timestamps: an event's ``timestamp`` is its 0-based **position in the
user's list** (``info["timestamp_unit"] == "list_position"``), so per-user order is exact
but positions of different users are not comparable in time; leave-one-out is the
meaningful protocol, a global time split is only an approximation.

Item text columns: ``title``, ``description``, ``brand``, ``categories`` (empty strings
become missing). Expected for Scientific: 8,317 users, 4,344 items, 58,492 events.
"""

from __future__ import annotations

import json
import logging
import re
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recsys.data.canonical import Dataset
from recsys.errors import DataFormatError, DatasetNotFoundError

logger = logging.getLogger(__name__)

TEXT_FIELDS = ("title", "description", "brand", "categories")


class _Object(dict):
    """A JSON object that remembers keys seen twice (plain ``json`` keeps the last one)."""

    duplicates: list[str]


def _object_hook(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object(pairs)
    obj.duplicates = []
    if len(obj) < len(pairs):
        seen: set[str] = set()
        obj.duplicates = [k for k, _ in pairs if k in seen or seen.add(k)]
    return obj


def _line_of_key(text: str, key: str, occurrence: int = 0) -> int | None:
    """1-based line of the ``occurrence``-th ``"key":`` in ``text`` (for error messages)."""
    hits = list(re.finditer(rf'"{re.escape(key)}"\s*:', text))
    if len(hits) <= occurrence:
        return None
    return text.count("\n", 0, hits[occurrence].start()) + 1


def read_json_object(path: Path) -> tuple[_Object, str]:
    """Parse ``path`` as one JSON object; return it and the raw text (for line lookups)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataFormatError(path, None, f"not UTF-8 text ({exc.reason})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_object_hook)
    except json.JSONDecodeError as exc:
        raise DataFormatError(
            path,
            exc.lineno,
            f"invalid JSON at column {exc.colno}: {exc.msg} (truncated or corrupt file?)",
        ) from None
    if not isinstance(obj, dict):
        raise DataFormatError(
            path, 1, f"expected a JSON object at the top level, found {type(obj).__name__}"
        )
    if obj.duplicates:
        key = obj.duplicates[0]
        raise DataFormatError(
            path, _line_of_key(text, key, 1), f"duplicate id {key!r}; ids must be unique"
        )
    return obj, text


def _items_frame(raw: _Object, text: str, path: Path) -> pd.DataFrame:
    columns: dict[str, list[Any]] = {"item_id": []}
    columns.update({f: [] for f in TEXT_FIELDS})
    for item_id, rec in raw.items():  # ~4k items
        if not isinstance(rec, dict):
            raise DataFormatError(
                path, _line_of_key(text, item_id), f"item {item_id!r}: expected an object"
            )
        if rec.duplicates:  # type: ignore[attr-defined]
            raise DataFormatError(
                path,
                _line_of_key(text, item_id),
                f"item {item_id!r}: duplicate field {rec.duplicates[0]!r}",  # type: ignore[attr-defined]
            )
        columns["item_id"].append(str(item_id))
        for f in TEXT_FIELDS:
            value = rec.get(f)
            if isinstance(value, list):
                value = ", ".join(map(str, value))
            columns[f].append(None if value is None else (str(value).strip() or None))
    if not columns["item_id"]:
        raise DataFormatError(path, None, "no items")
    return pd.DataFrame(columns)


def _interactions_frame(raw: _Object, text: str, path: Path, known: pd.Index) -> pd.DataFrame:
    users = list(raw.keys())
    lists = list(raw.values())
    for user, seq in zip(users, lists, strict=True):  # ~8k users, a type check each
        if not isinstance(seq, list) or not all(
            isinstance(i, (int, str)) and not isinstance(i, bool) for i in seq
        ):
            raise DataFormatError(
                path, _line_of_key(text, user), f"user {user!r}: expected a list of item ids"
            )
    lengths = np.fromiter((len(s) for s in lists), dtype=np.int64, count=len(lists))  # [U]
    item_ids = pd.Series(list(chain.from_iterable(lists)), dtype=object).astype(str)  # [N]
    user_ids = np.repeat(np.asarray(users, dtype=object), lengths)  # [N]
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)  # [N] start of each user's block
    position = np.arange(len(item_ids), dtype=np.int64) - starts  # [N] 0-based list position
    unknown = np.flatnonzero(known.get_indexer(item_ids) < 0)
    if len(unknown):
        user = str(user_ids[unknown[0]])
        raise DataFormatError(
            path,
            _line_of_key(text, user),
            f"user {user!r}: unknown item id {item_ids.iloc[unknown[0]]!r} (not in the item file); "
            f"{len(unknown)} event(s) refer to unknown items",
        )
    if len(item_ids) == 0:
        raise DataFormatError(path, None, "no interactions")
    return pd.DataFrame(
        {"user_id": user_ids.astype(str), "item_id": item_ids.to_numpy(), "timestamp": position}
    )


def load_lcrec(folder: str | Path, prefix: str, name: str) -> Dataset:
    """Load ``folder/PREFIX.inter.json`` + ``folder/PREFIX.item.json`` as dataset ``name``.

    Example::

        ds = load_lcrec("../shared/data/amazon-scientific", "Scientific", "amazon-scientific")
        ds.num_users, ds.num_items, len(ds.interactions)   # (8317, 4344, 58492)
    """
    folder = Path(folder)
    inter_path, item_path = folder / f"{prefix}.inter.json", folder / f"{prefix}.item.json"
    for required in (inter_path, item_path):
        if not required.is_file():
            raise DatasetNotFoundError(
                f"{required} not found (LC-Rec format: {prefix}.inter.json + {prefix}.item.json)"
            )
    raw_items, item_text = read_json_object(item_path)
    items = _items_frame(raw_items, item_text, item_path)
    raw_inter, inter_text = read_json_object(inter_path)
    inter = _interactions_frame(raw_inter, inter_text, inter_path, pd.Index(items["item_id"]))
    logger.info("%s: %d users, %d items, %d events", name, len(raw_inter), len(items), len(inter))
    info = {
        "source": str(folder),
        "timestamp_unit": "list_position",
        "timestamp_note": "no real time: timestamp = 0-based position in the user's list",
        "text_columns": list(TEXT_FIELDS),
    }
    return Dataset(name=name, items=items, interactions=inter, info=info)


def load_amazon_scientific(folder: str | Path) -> Dataset:
    """Amazon 2018 Industrial & Scientific, 5-core (LC-Rec files)."""
    return load_lcrec(folder, "Scientific", "amazon-scientific")
