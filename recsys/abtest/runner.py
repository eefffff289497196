"""Run an experiment over the replay stream (``recsys abtest run``).

1. Every arm's ``policy`` becomes a :class:`recsys.replay.config.PolicySpec`; arms with the
   same policy share one replay, and the static policy is always replayed (covariate).
2. The replay engine runs each policy once over **all** replay users. A user's records
   depend only on that user's events (:mod:`recsys.replay.engine`), so keeping each
   user's records from their own arm is exactly "each user's events evaluated under
   their arm", and re-randomising (A/A studies) needs no new replay. The exception is
   an arm with the cloud's fleet guard (``fleet_guard = true``): its verdicts pool the
   shadow-scored clicks of every replayed user, as if every device in the fleet reported
   its evidence, not only that arm's devices.
3. Users are assigned by the hash of (salt, user id) and the assignments persisted in
   the prototype store (:mod:`recsys.abtest.persist`).
4. **Pre-period** (``[replay] pre_period_events = N``): each user's first N evaluated
   replay events, scored by the static model, are their pre-period; the mean metric there
   is the user's CUPED covariate (it cannot depend on the arm: everybody is on the static
   model). The user enters the experiment at their event N + 1; only later events count,
   scored under their arm's policy. (The arm's device has been running its policy since
   the start of the replay, so at enrolment it holds the edit its own history asked for,
   as a freshly enrolled device would right after its first request.) Users with <= N
   evaluated events are never exposed. The experiment starts at the first exposure; day
   d = whole days since then.

Example::

    result = run_experiment(exp, ds, cache=settings.cache_dir(), out=Path("out"))
    result.users.values["ndcg@10"], result.info["users_with_covariate"]
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recsys.abtest.experiment import Experiment
from recsys.abtest.usertable import DailyTable, Events, UserTable, summarise, write_tables
from recsys.data import Dataset
from recsys.errors import ValidationError
from recsys.replay import EventRecords, PolicySpec, ReplayConfig

logger = logging.getLogger(__name__)

STATIC = PolicySpec("static")
REPLAY_METRICS = ("ndcg@10", "hr@10", "mrr@10", "auc", "request_rate")


@dataclass
class RunResult:
    users: UserTable
    daily: DailyTable
    info: dict[str, Any]


def arm_policies(exp: Experiment) -> tuple[dict[str, str], list[PolicySpec]]:
    """arm -> policy label, and the distinct policies to replay (static always included)."""
    specs: dict[str, PolicySpec] = {STATIC.label: STATIC}
    arm_label = {}
    for arm in exp.arms:
        try:
            spec = PolicySpec.from_dict(arm.policy)
        except ValidationError as exc:
            raise ValidationError(f"arm {arm.name!r}: {exc}") from None
        specs.setdefault(spec.label, spec)
        arm_label[arm.name] = spec.label
    return arm_label, list(specs.values())


def check_replay_metrics(exp: Experiment) -> None:
    bad = [m for m in exp.metrics if m not in REPLAY_METRICS]
    if bad:
        raise ValidationError(
            f"metric(s) {bad} are not measured by a replay (only by the live event log); "
            f"replay metrics: {list(REPLAY_METRICS)}"
        )


def event_numbers(rec: EventRecords) -> np.ndarray:
    """0-based number of each event among its user's events, in time order, int64 [E]."""
    order = np.lexsort((np.arange(len(rec)), rec.timestamp, rec.user))  # user, time, stable
    sorted_user = rec.user[order]
    first = np.r_[True, sorted_user[1:] != sorted_user[:-1]]
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(rec)), 0))
    out = np.empty(len(rec), np.int64)
    out[order] = np.arange(len(rec)) - group_start
    return out


def to_events(rec: EventRecords, user_pos: np.ndarray) -> Events:
    """Replay records -> :class:`Events` (``user_pos`` maps dataset user index -> row)."""
    return Events(
        user=user_pos[rec.user],
        timestamp=rec.timestamp,
        rank=rec.rank,
        auc=rec.auc,
        requested=rec.requested.astype(np.float64),
    )


def build_tables(
    records: dict[str, EventRecords],
    arm_label: dict[str, str],
    user_index: np.ndarray,
    user_ids: np.ndarray,
    user_arm: np.ndarray,
    *,
    metrics: list[str],
    pre_events: int,
) -> tuple[UserTable, DailyTable, dict[str, Any]]:
    """Per-user tables of one assignment from per-policy replay records.

    Args:
        records: policy label -> records over all users (must include "static").
        arm_label: arm -> policy label.
        user_index: [U] dataset user indices; user_ids: [U] their ids; user_arm: [U] arms.
        pre_events: N of the pre-period (see the module docstring).
    """
    pos = np.full(int(user_index.max()) + 1, -1, np.int64)
    pos[user_index] = np.arange(len(user_index))
    static = records[STATIC.label]
    static_pre = static.take(np.flatnonzero(event_numbers(static) < pre_events))
    parts = []
    for arm, label in arm_label.items():
        rec = records[label]
        members = user_index[user_arm == arm]
        keep = np.isin(rec.user, members) & (event_numbers(rec) >= pre_events)
        parts.append(rec.take(np.flatnonzero(keep)))
    exp_rec = EventRecords.concat(parts).sorted()
    if not len(exp_rec):
        raise ValidationError(
            f"no user has more than pre_period_events={pre_events} evaluated replay events; "
            "lower [replay] pre_period_events"
        )
    start = int(exp_rec.timestamp.min())
    users, daily = summarise(
        user_ids,
        user_arm,
        to_events(exp_rec, pos),
        metrics=metrics,
        start=start,
        pre_events=to_events(static_pre, pos) if len(static_pre) else None,
    )
    info = {
        "start": start,
        "experiment_events": len(exp_rec),
        "pre_period_events": len(static_pre),
        "exposed_users": len(users),
        "users_with_covariate": int((users.pre_n_events > 0).sum()),
    }
    return users, daily, info


def replay_users(records: dict[str, EventRecords]) -> np.ndarray:
    """Dataset indices of the users with evaluated events, ascending [U]."""
    return np.unique(np.concatenate([r.user for r in records.values()]))


def run_experiment(
    exp: Experiment,
    ds: Dataset,
    *,
    cache: Path,
    out: Path,
    store_url: str | None = None,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    artifact: str | None = None,
) -> RunResult:
    """Replay, assign, persist, summarise and write ``out`` (see the module docstring);
    ``artifact``: the adaptor artefact (default: the dataset's ``adaptor.pt``)."""
    from codebook.store import PrototypeStore
    from recsys.abtest.persist import persist_assignments, stored_arm_counts
    from recsys.replay import run_replay

    check_replay_metrics(exp)
    arm_label, specs = arm_policies(exp)
    cfg = ReplayConfig(quantile=exp.replay.quantile, seed=seed, quick=quick, artifact=artifact)
    out.mkdir(parents=True, exist_ok=True)
    run = run_replay(ds, cfg, specs, cache=cache, progress=progress)
    user_index = replay_users(run.records)
    user_ids = np.asarray(ds.user_ids, dtype=object)[user_index].astype(str)
    url = store_url or f"sqlite:///{(out / 'assignments.sqlite').resolve()}"
    with PrototypeStore.open(url, upgrade=True) as store:
        stored = persist_assignments(store, exp, user_ids.tolist())
        counts = stored_arm_counts(store, exp)
    user_arm = np.array([stored[u] for u in user_ids.tolist()], dtype=str)
    users, daily, info = build_tables(
        run.records,
        arm_label,
        user_index,
        user_ids,
        user_arm,
        metrics=exp.metrics,
        pre_events=exp.replay.pre_period_events,
    )
    write_tables(out, users, daily)
    info.update(
        source="replay",
        assigned_users=len(user_ids),
        stored_arm_counts=counts,
        store="DIR/assignments.sqlite" if store_url is None else "given by --store-url",
        arm_policies=arm_label,
        costs={arm: run.costs[label] for arm, label in arm_label.items()},
        replay=run.meta,
    )
    (out / "experiment.json").write_text(json.dumps(exp.to_dict(), indent=2) + "\n")
    (out / "run.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    return RunResult(users, daily, info)
