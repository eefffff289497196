"""The registry: prepare once into the cache, reuse, force, load by path, clear errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from recsys.data.registry import DATASETS, load_dataset, prepare_dataset
from recsys.errors import DatasetNotFoundError


def test_prepare_reuses_and_forces(make_recbole: Callable[..., Path], tmp_path: Path) -> None:
    raw = make_recbole().parent
    cache = tmp_path / "cache"
    path = prepare_dataset("ml-100k", data_dir=raw, cache_dir=cache)
    assert path == cache / "datasets" / "ml-100k"
    info = json.loads((path / "dataset.json").read_text())
    assert info["loader_version"] == DATASETS["ml-100k"].version
    assert info["ml1m_join"]["rate"] == 1.0
    # change the raw data: a plain prepare reuses the cached copy, --force rebuilds it
    inter = raw / "ml-100k" / "ml-100k.inter"
    inter.write_text("".join(inter.read_text().splitlines(keepends=True)[:-1]))
    assert prepare_dataset("ml-100k", data_dir=raw, cache_dir=cache) == path
    assert len(load_dataset(path).interactions) == 4
    prepare_dataset("ml-100k", data_dir=raw, cache_dir=cache, force=True)
    assert len(load_dataset(path).interactions) == 3


def test_stale_loader_version_is_rebuilt(make_recbole: Callable[..., Path], tmp_path: Path) -> None:
    raw = make_recbole().parent
    cache = tmp_path / "cache"
    path = prepare_dataset("ml-100k", data_dir=raw, cache_dir=cache)
    info = json.loads((path / "dataset.json").read_text())
    info["loader_version"] = -1
    (path / "dataset.json").write_text(json.dumps(info))
    prepare_dataset("ml-100k", data_dir=raw, cache_dir=cache)
    assert (
        json.loads((path / "dataset.json").read_text())["loader_version"]
        == DATASETS["ml-100k"].version
    )


def test_load_by_name_and_by_path(make_recbole: Callable[..., Path], tmp_path: Path) -> None:
    raw = make_recbole().parent
    cache = tmp_path / "cache"
    by_name = load_dataset("ml-100k", data_dir=raw, cache_dir=cache)
    by_path = load_dataset(cache / "datasets" / "ml-100k")
    assert by_name.fingerprint() == by_path.fingerprint()
    assert (by_path.num_users, by_path.num_items) == (2, 3)


def test_unknown_name_lists_known_datasets(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as exc:
        load_dataset("ml-20m", cache_dir=tmp_path)
    for name in DATASETS:
        assert name in str(exc.value)


def test_missing_raw_data_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as exc:
        prepare_dataset("tiktok", data_dir=tmp_path / "nowhere", cache_dir=tmp_path / "cache")
    msg = str(exc.value)
    assert str(tmp_path / "nowhere" / "tiktok") in msg
    assert str(tmp_path / "cache" / "raw" / "tiktok") in msg
    assert "--data-dir" in msg


def test_fetched_data_in_cache_raw_is_found(
    make_grouplens: Callable[..., Path], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    make_grouplens(cache / "raw")  # where `recsys data fetch` writes by default
    ds = load_dataset("ml-100k", data_dir=tmp_path / "empty", cache_dir=cache)
    assert ds.info["layout"] == "grouplens" and ds.num_items == 4
