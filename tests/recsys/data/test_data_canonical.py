"""The canonical dataset directory: round trip, and every malformed input names file + line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys.data.canonical import Dataset, read_dataset, write_dataset
from recsys.errors import DataFormatError


def _dataset() -> Dataset:
    items = pd.DataFrame(
        {
            "item_id": ["a", "b", "c"],
            "title": ["Alpha", "Beta ünïcode", None],
            "genres": ["x, y", "y", "z"],
        }
    )
    inter = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u2", "u2"],
            "item_id": ["b", "a", "c", "a"],
            "timestamp": [20, 10, 30, 10],
            "rating": [4.0, 5.0, 1.5, 3.0],
        }
    )
    features = {"image": np.arange(6, dtype=np.float32).reshape(3, 2)}
    return Dataset("toy", items, inter, features, info={"source": "test", "join": {"rate": 0.5}})


def test_round_trip_keeps_everything(tmp_path: Path) -> None:
    ds = _dataset()
    path = write_dataset(ds, tmp_path / "toy")
    back = read_dataset(path)
    assert back.name == "toy"
    assert back.info["join"] == {"rate": 0.5}
    pd.testing.assert_frame_equal(
        back.interactions.reset_index(drop=True),
        ds.interactions.reset_index(drop=True),
        check_dtype=False,
    )
    assert list(back.interactions["timestamp"]) == [10, 10, 20, 30]  # stable time order
    assert back.items["item_id"].tolist() == ["a", "b", "c"]
    assert back.items["title"].iloc[1] == "Beta ünïcode"
    assert pd.isna(back.items["title"].iloc[2])
    np.testing.assert_array_equal(back.features["image"], ds.features["image"])
    assert back.fingerprint() == ds.fingerprint()
    # rewriting over an existing directory replaces it atomically
    write_dataset(back, path)
    assert read_dataset(path).fingerprint() == ds.fingerprint()


@pytest.fixture
def canonical_dir(tmp_path: Path) -> Path:
    return write_dataset(_dataset(), tmp_path / "toy")


def test_missing_column(canonical_dir: Path, assert_names) -> None:
    (canonical_dir / "interactions.csv").write_text("user_id,item_id,rating\nu1,a,4\n")
    with pytest.raises(DataFormatError) as exc:
        read_dataset(canonical_dir)
    assert_names(exc.value, "interactions.csv", 1, "missing column", "timestamp")


def test_unknown_item_id(canonical_dir: Path, assert_names) -> None:
    (canonical_dir / "interactions.csv").write_text(
        "user_id,item_id,timestamp\nu1,a,1\nu1,b,2\nu2,zzz,3\n"
    )
    with pytest.raises(DataFormatError) as exc:
        read_dataset(canonical_dir)
    assert_names(exc.value, "interactions.csv", 4, "unknown item_id 'zzz'")


def test_non_numeric_timestamp(canonical_dir: Path, assert_names) -> None:
    (canonical_dir / "interactions.csv").write_text(
        "user_id,item_id,timestamp\nu1,a,1\nu1,b,yesterday\n"
    )
    with pytest.raises(DataFormatError) as exc:
        read_dataset(canonical_dir)
    assert_names(exc.value, "interactions.csv", 3, "timestamp 'yesterday' is not an integer")


def test_truncated_items_jsonl(canonical_dir: Path, assert_names) -> None:
    path = canonical_dir / "items.jsonl"
    text = path.read_text(encoding="utf-8")
    path.write_text(text[: len(text) - 15], encoding="utf-8")  # cut inside the last object
    with pytest.raises(DataFormatError) as exc:
        read_dataset(canonical_dir)
    assert_names(exc.value, "items.jsonl", 3, "invalid JSON")


def test_duplicate_item_id(canonical_dir: Path, assert_names) -> None:
    lines = [json.dumps({"item_id": i}) for i in ("a", "b", "c", "b")]
    (canonical_dir / "items.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError) as exc:
        read_dataset(canonical_dir)
    assert_names(exc.value, "items.jsonl", 4, "duplicate item_id 'b'")


def test_bad_feature_shape(canonical_dir: Path, assert_names) -> None:
    np.save(canonical_dir / "features" / "image.npy", np.zeros((2, 4), dtype=np.float32))
    with pytest.raises(DataFormatError) as exc:
        read_dataset(canonical_dir)
    # a .npy file has no lines: the message names the file and the shapes
    assert_names(exc.value, "image.npy", None, "shape (2, 4)", "num_items=3")
