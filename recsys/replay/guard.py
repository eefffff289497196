"""The harm guard in the replay: which of a guarded policy's edits the device applies.

A guarded policy requests exactly where its unguarded twin does (triggers see histories
only) and receives the same edits. At each request the device's guard
(:class:`device_ranker.guard.HarmGuard`) looks at the device's clicks BEFORE the request:
each scored by the base head (the static policy's rank) and by the candidate edit the
device held then (the unguarded twin's rank: the edit it served, or scored in shadow when
it had rejected it), which was made before that click. An accepted edit serves its
events as in the twin; a rejected one leaves them to the base head (the static ranks).
So the guarded records are a per-request choice between two already-scored rows: no
edit is rebuilt and no event is re-ranked, and the device's decisions depend on its own
events only.

The guard's own time is measured as the device runs it: per request, the check over the
device's last ``window`` clicks (:meth:`HarmGuard.accept` on a :class:`GuardState`).

Shapes: R requests, E evaluated events.

Example::

    rank, auc = guard_policy(guard, lengths, positions, served, (rank, auc), (base_rank, base_auc), acc)
    acc.guard_accepted, acc.guard_rejected, acc.guard_us
"""

from __future__ import annotations

import time

import numpy as np

from device_ranker.guard import GuardState, HarmGuard, click_gain
from recsys.replay.costs import CostAccumulator


def guard_policy(
    guard: HarmGuard,
    lengths: np.ndarray,
    positions: np.ndarray,
    served: np.ndarray,
    edited: tuple[np.ndarray, np.ndarray],
    base: tuple[np.ndarray, np.ndarray],
    costs: CostAccumulator,
) -> tuple[np.ndarray, np.ndarray]:
    """The guarded ranks [E] and AUCs [E] of one device; counts into ``costs``.

    Args:
        lengths: [R] history lengths of the policy's requests.
        positions: [E] history lengths of the evaluated events (ascending).
        served: [E] index into ``lengths`` of the request serving each event (-1: none).
        edited: (ranks [E], AUCs [E]) with every edit applied (the unguarded twin).
        base: (ranks [E], AUCs [E]) of the base head (static).
        costs: the policy's accumulator (guard decisions and µs are added).
    """
    rank, auc = edited
    base_rank, base_auc = base
    diffs = click_gain(rank) - click_gain(base_rank)  # [E]
    had_edit = served >= 0  # the click came after some edit: its candidate is scored
    ends = np.searchsorted(positions, lengths, side="left")  # clicks before each request
    accepted = guard.accept_many(diffs, had_edit, ends)  # [R]
    costs.guard_accepted += int(accepted.sum())
    costs.guard_rejected += int((~accepted).sum())
    costs.guard_us.extend(_device_check_us(guard, diffs, had_edit, ends))
    use = had_edit & accepted[np.maximum(served, 0)]  # [E]
    return np.where(use, rank, base_rank), np.where(use, auc, base_auc)


def _device_check_us(
    guard: HarmGuard, diffs: np.ndarray, had_edit: np.ndarray, ends: np.ndarray
) -> list[float]:
    """µs of each request's check as the device runs it (its state holds the clicks so far)."""
    out = []
    state = GuardState.empty(guard.config.window)
    done = 0
    for end in ends.tolist():
        for i in range(done, end):
            if had_edit[i]:
                state.diffs.append(float(diffs[i]))
        done = max(done, end)
        t0 = time.perf_counter()
        guard.accept(state)
        out.append((time.perf_counter() - t0) * 1e6)
    return out
