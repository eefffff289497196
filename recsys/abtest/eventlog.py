"""Live traffic: turn the device service's event log into the per-user tables.

``recsys serve device --experiment FILE --event-log PATH`` writes one JSON object per
recorded event (``device_ranker.service.event_log``): ``user_id``, ``arm``,
``experiment``, ``timestamp`` (unix seconds), ``rank`` (1-based, of the true item under
the model the user was served), ``requested``, ``bytes_up``, ``bytes_down`` and more.
This module reads the lines of one experiment and builds the same ``users.csv`` /
``daily.csv`` as a replay run, so one analysis serves both.

* The experiment starts at the first logged event; day d = whole days since then.
* There is no pre-period in a live log, so there is no CUPED covariate (the analysis
  reports the plain Welch test as the decision test).
* ``bytes`` = bytes_up + bytes_down; ``auc`` is not logged (an experiment naming it as a
  metric is rejected with a clear error).
* Each user must carry one arm throughout, and it is checked against the hash assignment
  of the experiment's salt: users whose logged arm differs are counted in
  ``assignment_mismatches`` (a broken client), and the SRM check runs on the logged arms.

Example::

    users, daily, info = read_event_log("events.jsonl", exp)
    write_tables(out_dir, users, daily)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recsys.abtest.assignment import assign_arms
from recsys.abtest.experiment import Experiment
from recsys.abtest.usertable import DailyTable, Events, UserTable, summarise
from recsys.data.canonical import iter_jsonl
from recsys.errors import DataFormatError, NotFoundError

REQUIRED = (
    "user_id",
    "arm",
    "experiment",
    "timestamp",
    "rank",
    "requested",
    "bytes_up",
    "bytes_down",
)


def read_event_log(
    path: str | Path, exp: Experiment, min_history: int = 5
) -> tuple[UserTable, DailyTable, dict]:
    """Per-user and per-day tables of experiment ``exp`` from the JSON-lines log at ``path``.

    Events whose user had fewer than ``min_history`` earlier events (``history_len``, when
    the log has it) are skipped, as the replay evaluation skips them: before that no arm
    has asked for an edit yet.

    Returns (users, daily, info) with info: lines, events, other_experiment_lines,
    short_history_lines, start, users, assignment_mismatches.
    """
    p = Path(path)
    if not p.is_file():
        raise NotFoundError(f"event log {p} not found; pass the file given to --event-log")
    users: dict[str, int] = {}
    user_arm: list[str] = []
    ev_user, ts, rank, requested, nbytes = [], [], [], [], []
    lines = other = short = 0
    for lineno, rec in iter_jsonl(p):
        lines += 1
        missing = [k for k in REQUIRED if k not in rec]
        if missing:
            raise DataFormatError(p, lineno, f"missing key(s) {missing}")
        if rec["experiment"] != exp.name:
            other += 1
            continue
        if "history_len" in rec and int(rec["history_len"]) < min_history:
            short += 1
            continue
        uid, arm = str(rec["user_id"]), str(rec["arm"])
        k = users.setdefault(uid, len(users))
        if k == len(user_arm):
            user_arm.append(arm)
        elif user_arm[k] != arm:
            raise DataFormatError(
                p,
                lineno,
                f"user {uid!r} is logged in arm {arm!r} and earlier in "
                f"{user_arm[k]!r}; a user must keep one arm",
            )
        try:
            r = int(rec["rank"])
            t = int(rec["timestamp"])
            b = int(rec["bytes_up"]) + int(rec["bytes_down"])
        except (TypeError, ValueError):
            raise DataFormatError(
                p, lineno, "rank, timestamp, bytes_up and bytes_down must be integers"
            ) from None
        if r < 1:
            raise DataFormatError(p, lineno, f"rank {r} is not 1-based")
        ev_user.append(k)
        ts.append(t)
        rank.append(r)
        requested.append(bool(rec["requested"]))
        nbytes.append(b)
    if not ev_user:
        raise NotFoundError(
            f"{p}: no events of experiment {exp.name!r} in {lines} line(s) "
            f"({other} of other experiments); check --experiment"
        )
    ids = np.array(list(users), dtype=str)
    arms = np.array(user_arm, dtype=str)
    names = np.array([a.name for a in exp.arms])
    expected = names[assign_arms(exp.salt, ids.tolist(), exp.arm_pairs)]
    ts_arr = np.array(ts, np.int64)
    start = int(ts_arr.min())
    events = Events(
        user=np.array(ev_user, np.int64),
        timestamp=ts_arr,
        rank=np.array(rank, np.int64),
        requested=np.array(requested, np.float64),
        bytes=np.array(nbytes, np.float64),
    )
    table, daily = summarise(ids, arms, events, metrics=exp.metrics, start=start)
    info = {
        "source": "event log",
        "lines": lines,
        "events": len(ev_user),
        "other_experiment_lines": other,
        "short_history_lines": short,
        "min_history": min_history,
        "start": start,
        "users": len(ids),
        "assignment_mismatches": int((expected != arms).sum()),
        "users_with_covariate": 0,
    }
    return table, daily, info
