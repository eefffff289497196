"""The analysis unit: per-user metrics (``users.csv``) and per-day sums (``daily.csv``).

Both ``recsys abtest run`` (replay) and the live event log of the device service are
turned into these two files, which is all ``recsys abtest analyze`` reads.

``users.csv``, one row per exposed user (a user with at least one experiment event)::

    user_id,arm,n_events,<metric>...,pre_n_events,pre:<metric>...

* ``<metric>``: the user's mean of the metric over their experiment-period events;
* ``pre_n_events`` / ``pre:<metric>``: the same metric over the user's pre-period events
  under the static model (the CUPED covariate); empty when the user has no pre-period
  event (``pre_n_events`` = 0).

``daily.csv``, one row per (day, user) with events that day, for sequential analysis::

    day,user_id,arm,n_events,sum:<metric>...

``day`` = floor((timestamp - start) / 86400), 0-based from the experiment start.

Example::

    users, daily = summarise(user_ids, arms, events, metrics=["ndcg@10"], start=t0)
    write_tables(out_dir, users, daily)
    users, daily = read_tables(out_dir)
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recsys.abtest.metrics import event_values, per_user_means
from recsys.errors import DataFormatError, ValidationError

DAY_SECONDS = 86_400
USERS_FILE = "users.csv"
DAILY_FILE = "daily.csv"


@dataclass
class Events:
    """Experiment events, aligned arrays [E].

    ``user`` indexes the caller's user list; fields absent from the source (e.g. ``auc``
    in a live log) are None.
    """

    user: np.ndarray
    timestamp: np.ndarray
    rank: np.ndarray | None = None
    auc: np.ndarray | None = None
    requested: np.ndarray | None = None
    bytes: np.ndarray | None = None

    def fields(self) -> dict[str, np.ndarray | None]:
        return {
            "rank": self.rank,
            "auc": self.auc,
            "requested": self.requested,
            "bytes": self.bytes,
        }


@dataclass
class UserTable:
    """Per-user metrics: ``values[m]`` and ``pre[m]`` are float64 [U] (pre NaN if none)."""

    user_id: np.ndarray  # [U] str
    arm: np.ndarray  # [U] str
    n_events: np.ndarray  # [U] int64
    values: dict[str, np.ndarray]
    pre_n_events: np.ndarray  # [U] int64
    pre: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def metrics(self) -> list[str]:
        return list(self.values)

    def __len__(self) -> int:
        return len(self.user_id)


@dataclass
class DailyTable:
    """Cumulative per-day data: ``counts`` [D, U] events up to the end of day ``days[d]``
    and ``sums[m]`` [D, U] the metric's running sum; users in the UserTable's order."""

    days: np.ndarray  # [D] int64
    counts: np.ndarray  # [D, U]
    sums: dict[str, np.ndarray]


def summarise(
    user_ids: np.ndarray,
    arms: np.ndarray,
    events: Events,
    *,
    metrics: list[str],
    start: int,
    pre_events: Events | None = None,
) -> tuple[UserTable, DailyTable]:
    """Per-user and per-day tables from events (vectorised, no per-event Python loop).

    Args:
        user_ids: [U] user ids; arms: [U] each user's arm.
        events: experiment-period events (``user`` indexes ``user_ids``).
        metrics: metric names (:data:`recsys.abtest.metrics.METRICS`).
        start: experiment start (timestamp); events before it are an error.
        pre_events: the pre-period events under the static model (covariate), optional.

    Users without experiment events are dropped (never exposed).
    """
    user_ids, arms = np.asarray(user_ids).astype(str), np.asarray(arms).astype(str)
    num_users = len(user_ids)
    if arms.shape != (num_users,):
        raise ValidationError(f"arms must have shape [{num_users}], got {arms.shape}")
    ev_user = np.asarray(events.user, np.int64)
    ts = np.asarray(events.timestamp, np.int64)
    if ev_user.size and (ev_user.min() < 0 or ev_user.max() >= num_users):
        raise ValidationError("event user index outside the user list")
    if ts.size and ts.min() < start:
        raise ValidationError("experiment events before the experiment start")
    values = {m: event_values(m, **events.fields()) for m in metrics}  # [E] each
    means = {}
    counts = np.zeros(num_users)
    for m in metrics:
        means[m], counts = per_user_means(ev_user, values[m], num_users)
    if pre_events is not None and len(pre_events.user):
        pre_user = np.asarray(pre_events.user, np.int64)
        pre, pre_counts = {}, np.zeros(num_users)
        for m in metrics:
            try:
                v = event_values(m, **pre_events.fields())
            except ValidationError:  # the static model has no such field (e.g. bytes)
                pre[m] = np.full(num_users, np.nan)
                continue
            pre[m], pre_counts = per_user_means(pre_user, v, num_users)
    else:
        pre = {m: np.full(num_users, np.nan) for m in metrics}
        pre_counts = np.zeros(num_users)

    keep = counts > 0  # exposed users
    kept = np.flatnonzero(keep)
    remap = np.full(num_users, -1, np.int64)
    remap[kept] = np.arange(len(kept))
    users = UserTable(
        user_id=user_ids[kept],
        arm=arms[kept],
        n_events=counts[kept].astype(np.int64),
        values={m: means[m][kept] for m in metrics},
        pre_n_events=pre_counts[kept].astype(np.int64),
        pre={m: pre[m][kept] for m in metrics},
    )
    day = (ts - start) // DAY_SECONDS
    days = np.arange(int(day.max()) + 1 if day.size else 0, dtype=np.int64)
    col = remap[ev_user]
    shape = (len(days), len(kept))
    daily_counts = np.zeros(shape)
    np.add.at(daily_counts, (day, col), 1.0)
    sums = {}
    for m in metrics:
        s = np.zeros(shape)
        np.add.at(s, (day, col), values[m])
        sums[m] = np.cumsum(s, axis=0)
    return users, DailyTable(days, np.cumsum(daily_counts, axis=0), sums)


# ---- files ------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    return "" if not math.isfinite(x) else repr(float(x))


def write_tables(out: str | Path, users: UserTable, daily: DailyTable) -> None:
    """Write ``users.csv`` and ``daily.csv`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = users.metrics
    with open(out / USERS_FILE, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(
            ["user_id", "arm", "n_events", *metrics, "pre_n_events", *(f"pre:{m}" for m in metrics)]
        )
        for i in range(len(users)):
            w.writerow(
                [
                    users.user_id[i],
                    users.arm[i],
                    int(users.n_events[i]),
                    *(_fmt(users.values[m][i]) for m in metrics),
                    int(users.pre_n_events[i]),
                    *(_fmt(users.pre[m][i]) for m in metrics),
                ]
            )
    # back from cumulative to per-day increments, only non-empty (day, user) cells
    inc = np.diff(daily.counts, axis=0, prepend=0.0)
    inc_sums = {m: np.diff(daily.sums[m], axis=0, prepend=0.0) for m in metrics}
    with open(out / DAILY_FILE, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["day", "user_id", "arm", "n_events", *(f"sum:{m}" for m in metrics)])
        for d, u in zip(*np.nonzero(inc), strict=True):
            w.writerow(
                [
                    int(daily.days[d]),
                    users.user_id[u],
                    users.arm[u],
                    int(inc[d, u]),
                    *(repr(float(inc_sums[m][d, u])) for m in metrics),
                ]
            )


def read_tables(directory: str | Path) -> tuple[UserTable, DailyTable | None]:
    """Read ``users.csv`` (required) and ``daily.csv`` (optional) from ``directory``."""
    d = Path(directory)
    path = d / USERS_FILE
    if not path.is_file():
        raise DataFormatError(
            path, None, "missing; run `recsys abtest run` or convert an event log first"
        )
    header, rows = _read_csv(path)
    if header[:3] != ["user_id", "arm", "n_events"] or "pre_n_events" not in header:
        raise DataFormatError(
            path, 1, "header must be user_id,arm,n_events,<metrics>,pre_n_events,..."
        )
    metrics = header[3 : header.index("pre_n_events")]
    cols = list(zip(*rows, strict=True)) if rows else [()] * len(header)
    pre = {}
    for m in metrics:
        name = f"pre:{m}"
        if name in header:
            pre[m] = _column(path, cols[header.index(name)], name, float, empty=True)
        else:
            pre[m] = np.full(len(rows), np.nan)
    users = UserTable(
        user_id=np.array(cols[0], dtype=str),
        arm=np.array(cols[1], dtype=str),
        n_events=_column(path, cols[2], "n_events", int),
        values={m: _column(path, cols[3 + i], m, float) for i, m in enumerate(metrics)},
        pre_n_events=_column(path, cols[3 + len(metrics)], "pre_n_events", int),
        pre=pre,
    )
    if len(set(users.user_id.tolist())) != len(users):
        raise DataFormatError(path, None, "a user appears more than once")
    daily_path = d / DAILY_FILE
    if not daily_path.is_file():
        return users, None
    header, rows = _read_csv(daily_path)
    want = ["day", "user_id", "arm", "n_events", *(f"sum:{m}" for m in metrics)]
    if header != want:
        raise DataFormatError(daily_path, 1, f"header must be {','.join(want)}")
    index = {u: i for i, u in enumerate(users.user_id.tolist())}
    cols = list(zip(*rows, strict=True)) if rows else [()] * len(header)
    day = _column(daily_path, cols[0], "day", int)
    unknown = sorted(set(cols[1]) - set(index))
    if unknown:
        raise DataFormatError(daily_path, None, f"user(s) {unknown[:5]} not in {USERS_FILE}")
    col = np.array([index[u] for u in cols[1]], dtype=np.int64)
    if day.size and day.min() < 0:
        raise DataFormatError(daily_path, None, "negative day")
    days = np.arange(int(day.max()) + 1 if day.size else 0, dtype=np.int64)
    shape = (len(days), len(users))
    counts = np.zeros(shape)
    np.add.at(counts, (day, col), _column(daily_path, cols[3], "n_events", int))
    sums = {}
    for i, m in enumerate(metrics):
        s = np.zeros(shape)
        np.add.at(s, (day, col), _column(daily_path, cols[4 + i], f"sum:{m}", float))
        sums[m] = np.cumsum(s, axis=0)
    return users, DailyTable(days, np.cumsum(counts, axis=0), sums)


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise DataFormatError(path, 1, "empty file (expected a header line)")
        rows = []
        for line, row in enumerate(reader, start=2):
            if len(row) != len(header):
                raise DataFormatError(path, line, f"{len(row)} fields, header has {len(header)}")
            rows.append(row)
    return header, rows


def _column(path: Path, raw, name: str, kind, *, empty: bool = False) -> np.ndarray:
    """One CSV column as numbers (vectorised; the bad line is searched only on failure)."""
    arr = np.asarray(raw, dtype=str)
    if empty:
        arr = np.where(arr == "", "nan", arr)
    try:
        return arr.astype(np.float64 if kind is float else np.int64)
    except ValueError:
        for i, v in enumerate(arr):
            try:
                kind(v)
            except ValueError:
                raise DataFormatError(
                    path, i + 2, f"column {name}: {str(v)!r} is not a number"
                ) from None
        raise
