"""TikTok: feature alignment, the restricted unpickler, the phase timestamp scheme."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from recsys.data.canonical import read_dataset, write_dataset
from recsys.data.splits import time_split
from recsys.data.tiktok import (
    FEATURE_FILES,
    PHASE_FILES,
    RestrictedUnpickler,
    load_sparse_pickle,
    load_tiktok,
    phase_timestamps,
)
from recsys.errors import DataFormatError


@pytest.fixture(scope="module")
def tiktok_dir(raw_data_dir: Path) -> Path:
    folder = raw_data_dir / "tiktok"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    return folder


@pytest.fixture(scope="module")
def tiktok_prepared(tiktok_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The real dataset after a trip through the canonical directory."""
    return read_dataset(
        write_dataset(load_tiktok(tiktok_dir), tmp_path_factory.mktemp("tt") / "tiktok")
    )


def test_real_counts_and_phases(tiktok_prepared) -> None:
    ds = tiktok_prepared
    assert (ds.num_users, ds.num_items, len(ds.interactions)) == (9308, 6710, 59541 + 3051 + 6130)
    assert ds.info["phase_events"] == {"train": 59541, "valid": 3051, "test": 6130}
    assert ds.info["phase_start"] == {"train": 0, "valid": 59541, "test": 62592}
    split = time_split(ds, cut=ds.info["phase_start"]["valid"], min_train_events=1)
    assert len(split.train) == 59541
    assert len(split.replay) + len(split.cold_replay) == 3051 + 6130


def test_features_aligned_with_items(tiktok_prepared, tiktok_dir: Path) -> None:
    ds = tiktok_prepared
    for modality, filename in FEATURE_FILES.items():
        raw = np.load(tiktok_dir / filename)  # float16 [6710, 128], row = item index
        rows = ds.items["item_id"].astype(int).to_numpy()
        assert ds.features[modality].shape == (6710, 128)
        assert ds.features[modality].dtype == np.float32
        np.testing.assert_array_equal(ds.features[modality], raw[rows].astype(np.float32))


def test_interactions_match_the_matrices(tiktok_prepared, tiktok_dir: Path) -> None:
    ds = tiktok_prepared
    test = load_sparse_pickle(tiktok_dir / PHASE_FILES["test"])
    rows = ds.interactions["timestamp"] >= ds.info["phase_start"]["test"]
    got = set(
        zip(
            ds.interactions["user_id"][rows].astype(int),
            ds.interactions["item_id"][rows].astype(int),
            strict=True,
        )
    )
    assert got == set(zip(test.row.tolist(), test.col.tolist(), strict=True))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_refuses_other_classes(tmp_path: Path, assert_names) -> None:
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(DataFormatError) as exc:
        load_sparse_pickle(path)
    assert_names(exc.value, "evil.pkl", None, "refusing to load global", "system")
    with pytest.raises(pickle.UnpicklingError), open(path, "rb") as fh:
        RestrictedUnpickler(fh).load()


def test_restricted_unpickler_reads_current_scipy_pickles(tmp_path: Path) -> None:
    matrix = sp.coo_matrix((np.ones(3), ([0, 1, 1], [2, 0, 1])), shape=(2, 3))
    path = tmp_path / "m.pkl"
    path.write_bytes(pickle.dumps(matrix))
    back = load_sparse_pickle(path)
    assert (back != matrix).nnz == 0 and back.shape == (2, 3)
    path.write_bytes(pickle.dumps(matrix.tocsr()))
    assert load_sparse_pickle(path).nnz == 3


def _tiny_tiktok(folder: Path, image_rows: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    mats = {
        "train": ([0, 0, 1, 2, 2, 2], [3, 1, 0, 1, 2, 3]),
        "valid": ([1], [2]),
        "test": ([0, 2], [0, 0]),
    }
    for phase, (r, c) in mats.items():
        m = sp.coo_matrix((np.ones(len(r)), (r, c)), shape=(3, 4))
        (folder / PHASE_FILES[phase]).write_bytes(pickle.dumps(m))
    np.save(
        folder / FEATURE_FILES["image"],
        np.arange(image_rows * 2, dtype=np.float16).reshape(image_rows, 2),
    )
    np.save(folder / FEATURE_FILES["audio"], np.ones((4, 3), dtype=np.float16))
    return folder


def test_tiny_dataset_and_timestamp_scheme(tmp_path: Path) -> None:
    ds = load_tiktok(_tiny_tiktok(tmp_path / "tt"))
    inter = ds.interactions
    # train phase: round-robin over users, each user's items ascending
    train = inter[inter["timestamp"] < 6]
    assert list(zip(train["user_id"], train["item_id"], strict=True)) == [
        ("0", "1"), ("1", "0"), ("2", "1"), ("0", "3"), ("2", "2"), ("2", "3"),
    ]  # fmt: skip
    assert inter["timestamp"].tolist() == list(range(9))
    assert ds.info["phase_start"] == {"train": 0, "valid": 6, "test": 7}
    assert ds.features["audio"].shape == (4, 3)


def test_phase_timestamps_unit() -> None:
    users = np.array([1, 0, 1, 0, 1])
    items = np.array([5, 9, 2, 3, 7])
    # user 0: items 3, 9; user 1: items 2, 5, 7 -> order (0,3) (1,2) (0,9) (1,5) (1,7)
    np.testing.assert_array_equal(phase_timestamps(users, items, 100), [103, 102, 101, 100, 104])


def test_bad_feature_shape(tmp_path: Path, assert_names) -> None:
    folder = _tiny_tiktok(tmp_path / "tt", image_rows=3)
    with pytest.raises(DataFormatError) as exc:
        load_tiktok(folder)
    assert_names(exc.value, "image_feat.npy", None, "shape (3, 2)", "num_items=4")
