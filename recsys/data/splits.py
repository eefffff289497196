"""Splitters: functions from a :class:`Dataset` to index arrays over its interactions.

Two protocols:

* :func:`time_split` - a training period (everything the cloud learns from) and a later
  replay period (the stream the devices see), cut at a timestamp or a time quantile.
* :func:`leave_one_out` - per user, the last event by time is the test target, the one
  before it the validation target, the rest training (the standard sequential
  benchmark; ties in time keep file order, as RecBole does).

Both return row positions into ``ds.interactions`` (which is sorted stably by time), so
``ds.item_index[split.train]`` etc. give the items.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recsys.data.canonical import Dataset
from recsys.errors import ValidationError


@dataclass(frozen=True)
class TimeSplit:
    """Rows [N_*] of the training and replay periods.

    Attributes:
        train: rows with ``timestamp < cut``.
        replay: rows with ``timestamp >= cut`` of users who have at least
            ``min_train_events`` training events (warm users).
        cold_replay: replay rows of users with fewer training events; kept apart, not
            silently mixed in, so an evaluation chooses what to do with them.
        cut: the cut timestamp.
        cold_users: user indices whose replay rows are in ``cold_replay``.
    """

    train: np.ndarray
    replay: np.ndarray
    cold_replay: np.ndarray
    cut: int
    cold_users: np.ndarray

    def summary(self) -> dict[str, int]:
        return {
            "cut_timestamp": int(self.cut),
            "train_events": len(self.train),
            "replay_events": len(self.replay),
            "cold_replay_events": len(self.cold_replay),
            "cold_users": len(self.cold_users),
        }


def time_split(
    ds: Dataset,
    *,
    cut: int | None = None,
    quantile: float = 0.8,
    min_train_events: int = 5,
) -> TimeSplit:
    """Split by time at ``cut`` or, if None, at the ``quantile`` of event timestamps.

    Example::

        split = time_split(ds, quantile=0.8)
        train_items = ds.item_index[split.train]
    """
    if cut is None:
        if not 0.0 < quantile < 1.0:
            raise ValidationError(f"quantile must be in (0, 1), got {quantile}")
        cut = int(np.quantile(ds.timestamps, quantile, method="higher"))
    ts = ds.timestamps
    is_train = ts < cut
    if not is_train.any() or is_train.all():
        raise ValidationError(
            f"cut {cut} leaves an empty period (timestamps span {ts.min()}..{ts.max()})"
        )
    users = ds.user_index
    train_counts = np.bincount(users[is_train], minlength=ds.num_users)
    cold_user_mask = train_counts < min_train_events
    replay_rows = np.flatnonzero(~is_train)
    cold_rows = cold_user_mask[users[replay_rows]]
    return TimeSplit(
        train=np.flatnonzero(is_train),
        replay=replay_rows[~cold_rows],
        cold_replay=replay_rows[cold_rows],
        cut=int(cut),
        cold_users=np.unique(users[replay_rows[cold_rows]]),
    )


@dataclass(frozen=True)
class LeaveOneOutSplit:
    """Rows for leave-one-out by time.

    Attributes:
        train: every row except each kept user's last two events.
        valid: one row per kept user (their second-to-last event) [U_kept].
        test: one row per kept user (their last event) [U_kept], same user order as valid.
        users: the kept user indices [U_kept], ascending.
        skipped_users: users with fewer than ``min_events`` events; all their rows
            stay in ``train`` and they are not evaluated.
    """

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    users: np.ndarray
    skipped_users: np.ndarray


def leave_one_out(ds: Dataset, *, min_events: int = 3) -> LeaveOneOutSplit:
    """Hold out each user's last event (test) and the one before it (valid), by time."""
    if min_events < 3:
        raise ValidationError(f"min_events must be >= 3 (train + valid + test), got {min_events}")
    users = ds.user_index
    # rows are time-sorted already; a stable sort by user keeps time order within a user
    order = np.argsort(users, kind="stable")  # [N]
    counts = np.bincount(users, minlength=ds.num_users)  # [U]
    ends = np.cumsum(counts)  # exclusive end of each user's block in `order`
    kept = np.flatnonzero(counts >= min_events)
    test = order[ends[kept] - 1]
    valid = order[ends[kept] - 2]
    held_out = np.zeros(len(users), dtype=bool)
    held_out[test] = True
    held_out[valid] = True
    return LeaveOneOutSplit(
        train=np.flatnonzero(~held_out),
        valid=valid,
        test=test,
        users=kept,
        skipped_users=np.flatnonzero(counts < min_events),
    )


def user_sequences(ds: Dataset, rows: np.ndarray) -> list[np.ndarray]:
    """Item-index sequences per user over ``rows`` in time order: list of U int64 arrays.

    Users with no rows get an empty array. Vectorised (one stable sort, one split).
    """
    rows = np.sort(np.asarray(rows, dtype=np.int64))  # time order = row order
    users = ds.user_index[rows]
    order = np.argsort(users, kind="stable")
    counts = np.bincount(users, minlength=ds.num_users)
    return np.split(ds.item_index[rows][order], np.cumsum(counts)[:-1])
