"""Splits on real ml-100k: time split (quantile, cut, cold users) and leave-one-out."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from recsys.data.canonical import Dataset
from recsys.data.splits import leave_one_out, time_split, user_sequences
from recsys.errors import ValidationError


def _partition(ds: Dataset, *parts: np.ndarray) -> None:
    rows = np.concatenate(parts)
    assert len(rows) == len(ds.interactions) == len(np.unique(rows))


def test_time_split_by_quantile(ml100k: Dataset) -> None:
    split = time_split(ml100k, quantile=0.8)
    ts = ml100k.timestamps
    _partition(ml100k, split.train, split.replay, split.cold_replay)
    assert ts[split.train].max() < split.cut <= ts[split.replay].min()
    assert len(split.train) / len(ts) == pytest.approx(0.8, abs=0.01)
    # cold users are explicit: every one has < min_train_events training events
    train_counts = np.bincount(ml100k.user_index[split.train], minlength=ml100k.num_users)
    assert (train_counts[split.cold_users] < 5).all()
    assert set(np.unique(ml100k.user_index[split.cold_replay])) == set(split.cold_users)
    warm_users = np.unique(ml100k.user_index[split.replay])
    assert (train_counts[warm_users] >= 5).all()
    assert len(split.cold_users) > 0  # ml-100k has users who join late


def test_time_split_by_cut(ml100k: Dataset) -> None:
    cut = int(pd.Timestamp("1998-03-01", tz="UTC").timestamp())
    split = time_split(ml100k, cut=cut, min_train_events=1)
    assert split.cut == cut
    assert (ml100k.timestamps[split.train] < cut).all()
    assert (ml100k.timestamps[np.concatenate([split.replay, split.cold_replay])] >= cut).all()
    assert split.summary()["train_events"] == int((ml100k.timestamps < cut).sum())
    with pytest.raises(ValidationError, match="empty period"):
        time_split(ml100k, cut=int(ml100k.timestamps.min()))
    with pytest.raises(ValidationError, match="quantile"):
        time_split(ml100k, quantile=1.5)


def test_leave_one_out_matches_published_protocol(ml100k: Dataset) -> None:
    split = leave_one_out(ml100k)
    assert (len(split.valid), len(split.test), len(split.train)) == (943, 943, 98_114)
    assert len(split.skipped_users) == 0
    _partition(ml100k, split.train, split.valid, split.test)
    users = ml100k.user_index
    np.testing.assert_array_equal(users[split.valid], split.users)
    np.testing.assert_array_equal(users[split.test], split.users)
    # the test event is each user's latest, the valid event the one before
    latest = pd.Series(ml100k.timestamps).groupby(users).max().to_numpy()
    assert (ml100k.timestamps[split.test] == latest[split.users]).all()
    assert (ml100k.timestamps[split.valid] <= ml100k.timestamps[split.test]).all()
    seqs = user_sequences(ml100k, split.train)
    assert sum(len(s) for s in seqs) == 98_114
