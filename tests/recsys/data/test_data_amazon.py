"""Amazon (LC-Rec JSON): real counts, position timestamps, malformed JSON named by line."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from recsys.data.amazon import load_amazon_scientific, load_lcrec
from recsys.errors import DataFormatError, DatasetNotFoundError


@pytest.fixture(scope="module")
def scientific(raw_data_dir: Path):
    folder = raw_data_dir / "amazon-scientific"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    return load_amazon_scientific(folder)


def test_real_counts(scientific) -> None:
    # data README: 8,317 users, 4,344 items, 58,492 interactions
    assert (scientific.num_users, scientific.num_items, len(scientific.interactions)) == (
        8317,
        4344,
        58492,
    )
    assert set(scientific.items.columns) == {
        "item_id",
        "title",
        "description",
        "brand",
        "categories",
    }
    assert scientific.items["title"].notna().all()
    assert scientific.info["timestamp_unit"] == "list_position"


def test_timestamps_are_list_positions(scientific, raw_data_dir: Path) -> None:
    raw = json.loads((raw_data_dir / "amazon-scientific" / "Scientific.inter.json").read_text())
    inter = scientific.interactions
    user0 = inter[inter["user_id"] == "0"].sort_values("timestamp")
    assert user0["item_id"].tolist() == [str(i) for i in raw["0"]]
    assert user0["timestamp"].tolist() == list(range(len(raw["0"])))


def _write(folder: Path, inter: str, items: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Toy.inter.json").write_text(inter, encoding="utf-8")
    (folder / "Toy.item.json").write_text(items, encoding="utf-8")
    return folder


ITEMS = json.dumps(
    {
        "0": {"title": "Glass beaker", "description": "", "brand": "Pyrex", "categories": "Lab"},
        "1": {"title": "Pipette", "description": "10 ml", "brand": "", "categories": "Lab"},
        "2": {"title": "Gloves", "description": "Nitrile", "brand": "X", "categories": "Safety"},
    },
    indent=2,
)
INTER = '{\n  "0": [0, 1, 2],\n  "1": [2, 0]\n}\n'


def test_small_file(tmp_path: Path) -> None:
    ds = load_lcrec(_write(tmp_path, INTER, ITEMS), "Toy", "toy")
    assert (ds.num_users, ds.num_items, len(ds.interactions)) == (2, 3, 5)
    items = ds.items.set_index("item_id")
    assert items.at["0", "brand"] == "Pyrex"
    assert pd.isna(items.at["0", "description"])  # "" -> missing
    u1 = ds.interactions[ds.interactions["user_id"] == "1"].sort_values("timestamp")
    assert u1["item_id"].tolist() == ["2", "0"] and u1["timestamp"].tolist() == [0, 1]


def test_truncated_item_json(tmp_path: Path, assert_names) -> None:
    truncated = ITEMS[: ITEMS.index('"Pipette"') + 4]  # cut inside line 9
    with pytest.raises(DataFormatError) as exc:
        load_lcrec(_write(tmp_path, INTER, truncated), "Toy", "toy")
    assert_names(exc.value, "Toy.item.json", 9, "invalid JSON", "truncated")


def test_truncated_inter_json(tmp_path: Path, assert_names) -> None:
    with pytest.raises(DataFormatError) as exc:
        load_lcrec(_write(tmp_path, INTER[:25], ITEMS), "Toy", "toy")
    assert_names(exc.value, "Toy.inter.json", 3, "invalid JSON")


def test_duplicate_item_id(tmp_path: Path, assert_names) -> None:
    items = ITEMS[:-2] + ',\n  "1": {"title": "again"}\n}'
    with pytest.raises(DataFormatError) as exc:
        load_lcrec(_write(tmp_path, INTER, items), "Toy", "toy")
    assert_names(exc.value, "Toy.item.json", 20, "duplicate id '1'")


def test_unknown_item_id(tmp_path: Path, assert_names) -> None:
    inter = '{\n  "0": [0, 1],\n  "1": [2, 7]\n}\n'
    with pytest.raises(DataFormatError) as exc:
        load_lcrec(_write(tmp_path, inter, ITEMS), "Toy", "toy")
    assert_names(exc.value, "Toy.inter.json", 3, "user '1'", "unknown item id '7'")


def test_wrong_structure(tmp_path: Path, assert_names) -> None:
    inter = '{\n  "0": [0, 1],\n  "1": {"not": "a list"}\n}\n'
    with pytest.raises(DataFormatError) as exc:
        load_lcrec(_write(tmp_path, inter, ITEMS), "Toy", "toy")
    assert_names(exc.value, "Toy.inter.json", 3, "expected a list of item ids")


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"Toy\.inter\.json"):
        load_lcrec(tmp_path, "Toy", "toy")
