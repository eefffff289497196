"""The replay stream: the replay period's events, each device's starting history, which
events are evaluated, and the sampled negatives.

Protocol (configuration in :class:`~recsys.replay.config.ReplayConfig`, written into results):

* **Split**: ``time_split(ds, quantile)``; the replay period is every event at or after
  the cut, of warm users (``split.replay``) and of users with fewer than 5 training
  events (``split.cold_replay``, most of them new after the cut), in time order; with
  ``until_quantile`` only those before the cut at that quantile (a validation period).
* **Devices**: one per user. A device's history starts as its user's training-period
  events (empty for new users) and grows with its own replay events.
* **Events per device**: all of its replay events, or its first ``max_events``.
* **Evaluated events**: those whose history before the event has at least
  ``min_history`` events; the others only grow the history.
* **Negatives**: per evaluated event, ``negatives`` items drawn uniformly (without
  replacement when possible) from the items neither in the history nor the target, by a
  generator seeded with ``(seed, user, position)`` (position = history length before the
  event), so they depend neither on the worker count nor on which other users are in.
* **Requests** (policies, :mod:`recsys.replay.engine`): a device whose starting history
  already has ``min_history`` events makes its first request from it before its first
  replay event; a new device makes it right after its ``min_history``-th event. After
  each later event the trigger (gate or timer) sees the history INCLUDING that event and
  may ask for an edit, which serves the following events only.

Events are stored user-major (users ascending, each user's events in time order, ties
in file order): shape letter N = events in the stream, M = negatives.

Example::

    stream = build_stream(ds, ReplayConfig(), users=[3, 17])
    stream.summary()["evaluated_events"]
    sl = stream.user_slice(17)
    stream.item[sl], stream.evaluated[sl], stream.start_history(17)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from recsys.data import Dataset, time_split, user_sequences
from recsys.errors import ValidationError
from recsys.replay.config import ReplayConfig

logger = logging.getLogger(__name__)


@dataclass
class UserEvents:
    """One device's part of the stream (arrays over its N replay events).

    Attributes:
        user: dataset user index; start: [S] training-period items.
        items, timestamps, positions: [N] int64; evaluated: [N] bool; negatives: [N, M].
    """

    user: int
    start: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    positions: np.ndarray
    evaluated: np.ndarray
    negatives: np.ndarray

    @classmethod
    def from_stream(cls, stream: ReplayStream, user: int) -> UserEvents:
        """``stream.user_events(user)``."""
        return stream.user_events(user)

    @property
    def sequence(self) -> np.ndarray:
        """Training history followed by the replay items."""
        return np.concatenate([self.start, self.items])

    def truncated(self, n: int) -> UserEvents:
        """The same device with only its first ``n`` replay events."""
        return UserEvents(
            self.user,
            self.start,
            self.items[:n],
            self.timestamps[:n],
            self.positions[:n],
            self.evaluated[:n],
            self.negatives[:n],
        )


@dataclass
class ReplayStream:
    """The stream of one replay (see the module docstring).

    Attributes:
        dataset: name; fingerprint: dataset fingerprint; cut: the split's cut timestamp.
        users: [U] int64 users with replay events, ascending.
        offsets: [U + 1] int64; user ``users[k]``'s events are rows offsets[k]:offsets[k+1].
        user, item, timestamp: [N] int64 per event.
        position: [N] int64 history length before the event (training events included).
        evaluated: [N] bool, history before the event has >= min_history events.
        negatives: [N, M] int64 sampled negatives (-1 rows for events not evaluated).
        starts: per user in ``users``, the training-period history (int64 array).
        cold_users: [C] users of the split's cold replay (fewer than 5 training events).
        min_history, negatives_per_event, seed: the protocol used.
    """

    dataset: str
    fingerprint: str
    cut: int
    num_items: int
    users: np.ndarray
    offsets: np.ndarray
    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    position: np.ndarray
    evaluated: np.ndarray
    negatives: np.ndarray
    starts: dict[int, np.ndarray]
    cold_users: np.ndarray
    min_history: int
    negatives_per_event: int
    seed: int

    def __len__(self) -> int:
        return len(self.user)

    def user_slice(self, user: int) -> slice:
        """Rows of ``user``'s events."""
        k = int(np.searchsorted(self.users, user))
        if k >= len(self.users) or self.users[k] != user:
            raise ValidationError(f"user {user} has no events in this replay stream")
        return slice(int(self.offsets[k]), int(self.offsets[k + 1]))

    def start_history(self, user: int) -> np.ndarray:
        """The user's training-period items (oldest first)."""
        return self.starts[int(user)]

    def full_sequence(self, user: int) -> np.ndarray:
        """Training history followed by the user's replay items."""
        return np.concatenate([self.starts[int(user)], self.item[self.user_slice(user)]])

    def user_events(self, user: int) -> UserEvents:
        """One device's events (the unit the engine replays)."""
        sl = self.user_slice(user)
        return UserEvents(
            user=int(user),
            start=self.starts[int(user)],
            items=self.item[sl],
            timestamps=self.timestamp[sl],
            positions=self.position[sl],
            evaluated=self.evaluated[sl],
            negatives=self.negatives[sl],
        )

    def time_order(self) -> np.ndarray:
        """Row indices in global time order (timestamp, then user, then position)."""
        return np.lexsort((self.position, self.user, self.timestamp))

    def summary(self) -> dict[str, int]:
        cold = np.isin(self.user, self.cold_users)
        return {
            "stream_events": len(self),
            "stream_users": len(self.users),
            "evaluated_events": int(self.evaluated.sum()),
            "evaluated_users": len(np.unique(self.user[self.evaluated])),
            "evaluated_cold_user_events": int((self.evaluated & cold).sum()),
            "evaluated_warm_user_events": int((self.evaluated & ~cold).sum()),
            "skipped_events_short_history": int((~self.evaluated).sum()),
            "cut_timestamp": int(self.cut),
            "min_history": self.min_history,
            "negatives": self.negatives_per_event,
        }


def sample_negatives(
    history: np.ndarray, target: int, num_items: int, m: int, seed: Sequence[int]
) -> np.ndarray:
    """``m`` items not in ``history`` and not ``target``, drawn with ``default_rng(seed)``
    (with replacement only when fewer than ``m`` such items exist): int64 [m]."""
    banned = np.zeros(num_items, dtype=bool)
    banned[history] = True
    banned[target] = True
    pool = np.flatnonzero(~banned)
    if len(pool) == 0:
        raise ValidationError(f"no negative items left for an event with target {target}")
    rng = np.random.default_rng(list(seed))
    return rng.choice(pool, size=m, replace=len(pool) < m).astype(np.int64)


def select_users(candidates: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """At most ``limit`` of ``candidates`` (a seeded permutation's first ones), ascending."""
    candidates = np.unique(np.asarray(candidates, dtype=np.int64))
    if limit is None or limit >= len(candidates):
        return candidates
    perm = np.random.default_rng([seed, 11]).permutation(candidates)
    return np.sort(perm[:limit])


def build_stream(
    ds: Dataset, cfg: ReplayConfig, users: Sequence[int] | None = None
) -> ReplayStream:
    """The replay stream of ``ds`` under ``cfg`` (see the module docstring).

    Args:
        users: restrict to these dataset user indices (users without replay events are
            simply absent); None = every user with replay events. ``cfg.quick`` /
            ``cfg.max_users`` then keep a seeded sample of them.
    """
    split = time_split(ds, quantile=cfg.quantile)
    rows = np.sort(np.concatenate([split.replay, split.cold_replay]))  # time order
    if cfg.until_quantile is not None:  # a validation period: stop at the later cut
        until = time_split(ds, quantile=cfg.until_quantile).cut
        rows = rows[ds.timestamps[rows] < until]
    replay_users = np.unique(ds.user_index[rows])
    if users is not None:
        want = np.unique(np.asarray(list(users), dtype=np.int64))
        bad = want[(want < 0) | (want >= ds.num_users)]
        if len(bad):
            raise ValidationError(
                f"user indices {bad[:5].tolist()} are outside [0, {ds.num_users}) of {ds.name}"
            )
        replay_users = np.intersect1d(replay_users, want)
    chosen = select_users(replay_users, cfg.user_limit, cfg.seed)
    keep = np.isin(ds.user_index[rows], chosen)
    rows = rows[keep]
    ev_user = ds.user_index[rows].astype(np.int64)
    order = np.argsort(ev_user, kind="stable")  # user-major, time order kept
    rows = rows[order]
    ev_user = ev_user[order]
    if cfg.max_events is not None:  # each device's first max_events replay events
        first = np.searchsorted(ev_user, ev_user)  # [N] row of the user's first event
        keep = np.arange(len(rows)) - first < cfg.max_events
        rows, ev_user = rows[keep], ev_user[keep]
    item = ds.item_index[rows].astype(np.int64)
    ts = ds.timestamps[rows].astype(np.int64)
    counts = np.bincount(np.searchsorted(chosen, ev_user), minlength=len(chosen))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    train_seqs = user_sequences(ds, split.train)
    starts = {int(u): np.asarray(train_seqs[u], dtype=np.int64) for u in chosen}
    position = np.empty(len(rows), dtype=np.int64)
    for k, u in enumerate(chosen):
        a, b = offsets[k], offsets[k + 1]
        position[a:b] = len(starts[int(u)]) + np.arange(b - a)
    evaluated = position >= cfg.min_history
    m = cfg.negatives
    negs = np.full((len(rows), m), -1, dtype=np.int64)
    for k, u in enumerate(chosen):
        a, b = int(offsets[k]), int(offsets[k + 1])
        seq = np.concatenate([starts[int(u)], item[a:b]])
        for j in range(a, b):
            if evaluated[j]:
                p = int(position[j])
                negs[j] = sample_negatives(
                    seq[:p], int(item[j]), ds.num_items, m, (cfg.seed, int(u), p)
                )
    logger.info(
        "replay stream: %d events of %d users, %d evaluated",
        len(rows),
        len(chosen),
        evaluated.sum(),
    )
    return ReplayStream(
        dataset=ds.name,
        fingerprint=ds.fingerprint(),
        cut=int(split.cut),
        num_items=ds.num_items,
        users=chosen,
        offsets=offsets,
        user=ev_user,
        item=item,
        timestamp=ts,
        position=position,
        evaluated=evaluated,
        negatives=negs,
        starts=starts,
        cold_users=np.asarray(split.cold_users, dtype=np.int64),
        min_history=cfg.min_history,
        negatives_per_event=m,
        seed=cfg.seed,
    )
