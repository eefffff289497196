"""Named datasets: raw folder -> loader -> canonical directory in the cache.

``prepare_dataset("ml-100k")`` converts the raw files once into
``cache_dir()/datasets/ml-100k`` (a canonical dataset directory, see
:mod:`recsys.data.canonical`); ``load_dataset`` reads that directory, or any canonical
directory given by path, so a user can bring their own dataset without a loader.

Where raw data is looked for, in order: ``data_dir`` (or ``$RECSYS_DATA_DIR``, else
``../shared/data``; see :func:`recsys.settings.raw_data_dir`), then ``cache_dir()/raw``
(where ``recsys data fetch`` writes).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from recsys import settings
from recsys.data.amazon import load_amazon_scientific
from recsys.data.canonical import Dataset, read_dataset, write_dataset
from recsys.data.movielens import detect_layout, load_ml100k
from recsys.data.tiktok import load_tiktok
from recsys.errors import DatasetNotFoundError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset.

    Attributes:
        name: the name users type (``ml-100k``).
        folder: the raw folder's name under the data directory.
        loader: raw folder -> :class:`Dataset`.
        version: bump when the loader's output changes, so cached copies are rebuilt.
        description: one line for ``--help`` and errors.
        is_present: whether a raw folder holds the files the loader needs.
    """

    name: str
    folder: str
    loader: Callable[[Path], Dataset]
    version: int
    description: str
    is_present: Callable[[Path], bool]


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "ml-100k",
            "ml-100k",
            load_ml100k,
            1,
            "MovieLens 100K ratings (RecBole or GroupLens files) + ml-1m plot/director/actors",
            lambda folder: detect_layout(folder) is not None,
        ),
        DatasetSpec(
            "amazon-scientific",
            "amazon-scientific",
            load_amazon_scientific,
            1,
            "Amazon 2018 Industrial & Scientific 5-core (LC-Rec JSON), item text",
            lambda folder: (folder / "Scientific.inter.json").is_file(),
        ),
        DatasetSpec(
            "tiktok",
            "tiktok",
            load_tiktok,
            1,
            "TikTok micro-videos: train/valid/test matrices, image and audio features",
            lambda folder: (folder / "trnMat.pkl").is_file(),
        ),
    )
}


def _spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise DatasetNotFoundError(
            f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)} "
            "(or give the path of a canonical dataset directory)"
        ) from None


def raw_candidates(
    name: str, data_dir: str | Path | None = None, cache_dir: str | Path | None = None
) -> list[Path]:
    """The raw folders searched for ``name``, in order."""
    spec = _spec(name)
    roots = [settings.raw_data_dir(data_dir), settings.cache_dir(cache_dir) / "raw"]
    out: list[Path] = []
    for root in roots:
        if root / spec.folder not in out:
            out.append(root / spec.folder)
    return out


def find_raw(
    name: str, data_dir: str | Path | None = None, cache_dir: str | Path | None = None
) -> Path:
    """The first raw folder holding ``name``'s files, or a :class:`DatasetNotFoundError`."""
    spec = _spec(name)
    candidates = raw_candidates(name, data_dir, cache_dir)
    for folder in candidates:
        if folder.is_dir() and spec.is_present(folder):
            return folder
    fetch_hint = " or run `recsys data fetch ml-100k`" if name == "ml-100k" else ""
    raise DatasetNotFoundError(
        f"raw files of {name!r} not found; looked in {', '.join(str(c) for c in candidates)}. "
        f"Pass --data-dir (or set RECSYS_DATA_DIR) to the folder that holds {spec.folder}/{fetch_hint}"
    )


def prepared_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where ``name``'s canonical directory lives: ``cache_dir()/datasets/NAME``."""
    return settings.cache_dir(cache_dir) / "datasets" / name


def _is_current(dest: Path, spec: DatasetSpec) -> bool:
    if not ((dest / "interactions.csv").is_file() and (dest / "items.jsonl").is_file()):
        return False
    try:
        info = json.loads((dest / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("loader_version") == spec.version


def prepare_dataset(
    name: str,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Convert ``name``'s raw files into its canonical directory; return that directory.

    An existing directory written by the current loader version is reused unless
    ``force``. Writing is atomic (see :func:`recsys.data.canonical.write_dataset`).

    Example::

        path = prepare_dataset("ml-100k")   # ~/.cache/recsys-llm-edit/datasets/ml-100k
    """
    spec = _spec(name)
    dest = prepared_path(name, cache_dir)
    if not force and _is_current(dest, spec):
        logger.info("reusing prepared %s at %s", name, dest)
        return dest
    raw = find_raw(name, data_dir, cache_dir)
    start = time.perf_counter()
    ds = spec.loader(raw)
    ds.info["loader_version"] = spec.version
    write_dataset(ds, dest)
    logger.info(
        "prepared %s from %s in %.1f s: %d users, %d items, %d interactions -> %s",
        name, raw, time.perf_counter() - start, ds.num_users, ds.num_items, len(ds.interactions), dest,
    )  # fmt: skip
    return dest


def load_dataset(
    name_or_path: str | Path,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> Dataset:
    """A dataset by name (prepared on first use) or by canonical directory path.

    Example::

        ds = load_dataset("ml-100k")
        ds = load_dataset("path/to/my_dataset")   # interactions.csv + items.jsonl
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if (path / "interactions.csv").is_file() or (text not in DATASETS and path.is_dir()):
        return read_dataset(path)
    if text in DATASETS:
        return read_dataset(prepare_dataset(text, data_dir, cache_dir))
    raise DatasetNotFoundError(
        f"{text!r} is neither a known dataset ({', '.join(DATASETS)}) nor a directory "
        "(a canonical dataset directory holds interactions.csv and items.jsonl)"
    )
