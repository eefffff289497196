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

**Fleet guard** (policies with ``fleet_guard``): the same test, run in the cloud on the
pooled evidence of EVERY device's clicks made before the request (each device reports
its evidence, three floats: count, sum and sum of squares of its clicks' gain
differences; the replay assumes the reports arrive as the clicks happen). One device's
20 clicks cannot see a harm of a few thousandths of DCG per click; thousands of pooled
clicks can. The decision depends on other devices' earlier events, so it is made after
every device has been replayed (:func:`apply_fleet_guards`, from the data each device
leaves in ``UserResult.guard_inputs``), by timestamp: a request made after the event at
time t sees the clicks with timestamps < t. The per-click test ignores that one user's
clicks are correlated, which makes it quicker to keep edits out (the safe side).

**Proof guard** (``fleet_proof``, the opt-in twin): an edit is applied only when the
pooled evidence shows edits HELP (:func:`device_ranker.guard.benefit_test`). There a
per-click standard error would be the unsafe side, so the clicks are clustered by device:
the variance of the pooled mean is ``sum_u (s_u - n_u * mean)^2 / n^2`` over devices u
with s_u, n_u their sums and counts so far, kept as three running sums
(:func:`_clustered_sums`) so every request's test is one lookup.

Shapes: R requests, E evaluated events, N events of every device.

Example::

    rank, auc = guard_policy(guard, lengths, positions, served, (rank, auc), (base_rank, base_auc), acc)
    acc.guard_accepted, acc.guard_rejected, acc.guard_us
    apply_fleet_guards(results, GuardConfig())     # rewrites the fleet-guarded records,
                                                   # returns {label: what the evidence told}

**What the pooled evidence can tell** (:func:`fleet_evidence_figures`, in hindsight): with
per-click gain differences of mean m and standard deviation sd, the pooled mean of n
clicks is one standard error from zero at n* = (sd / m)^2 clicks; before that its sign
is wrong with a probability above ~16 % (normal approximation), so any guard that reads
the sign (the harm test at z = 0, the proof test at z = 0) is partly a coin toss there.
The report gives n*, its share of the replay's clicks, and the share of requests applied
before and after it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Collection, Mapping, Sequence

import numpy as np

from device_ranker.guard import (
    GuardConfig,
    GuardState,
    HarmGuard,
    benefit_test,
    click_gain,
    harm_test,
)
from recsys.replay.costs import CostAccumulator
from recsys.replay.records import UserResult
from recsys.replay.stream import UserEvents


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


def fleet_guard_inputs(
    ev: UserEvents,
    lengths: np.ndarray,
    positions: np.ndarray,
    served: np.ndarray,
    edited: tuple[np.ndarray, np.ndarray],
    base: tuple[np.ndarray, np.ndarray],
) -> dict[str, np.ndarray]:
    """What :func:`apply_fleet_guards` needs of one device: per evaluated event [E] its
    time, gain difference, whether an edit served it, the serving request and both
    (rank, AUC) rows; per request [R] the time it was made (after the event at position
    ``L - 1``; a first request from the starting history: before the first replay event)."""
    start = len(ev.start)
    k = np.clip(np.asarray(lengths, dtype=np.int64) - 1 - start, 0, None)
    return {
        "ts": ev.timestamps[ev.evaluated],
        "diff": click_gain(edited[0]) - click_gain(base[0]),
        "had": served >= 0,
        "served": served,
        "request_ts": ev.timestamps[k] if len(ev.timestamps) else np.zeros(0, np.int64),
        "rank": edited[0],
        "auc": edited[1],
        "base_rank": base[0],
        "base_auc": base[1],
    }


def _clustered_sums(
    device: np.ndarray, diff: np.ndarray, had: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Running sums over devices of s_u^2, s_u * n_u and n_u^2 after each click.

    Args:
        device: [N] device index of each click, in time order.
        diff: [N] gain differences (0 where ``had`` is False).
        had: [N] the click counts as evidence.

    Returns:
        three [N + 1] arrays (index k: after the first k clicks).
    """
    h = had.astype(np.float64)
    order = np.argsort(device, kind="stable")  # each device's clicks, still in time order
    s_before = np.zeros(len(diff))
    n_before = np.zeros(len(diff))
    ds, hs, dev = diff[order], h[order], device[order]
    starts = np.r_[True, dev[1:] != dev[:-1]] if len(dev) else np.zeros(0, bool)
    group = np.cumsum(starts) - 1
    cs, ch = np.cumsum(ds), np.cumsum(hs)
    first = np.flatnonzero(starts)
    s_before[order] = cs - ds - (cs - ds)[first][group]  # the device's sum before the click
    n_before[order] = ch - hs - (ch - hs)[first][group]
    d_ss = 2 * s_before * diff + diff * diff  # (s + d)^2 - s^2
    d_sn = s_before * h + n_before * diff + diff * h  # (s + d)(n + h) - s n
    d_nn = 2 * n_before * h + h  # (n + h)^2 - n^2 (h is 0 or 1)
    return tuple(np.concatenate([[0.0], np.cumsum(x)]) for x in (d_ss, d_sn, d_nn))


def fleet_evidence_figures(
    diffs: np.ndarray, request_clicks: np.ndarray, accepted: np.ndarray
) -> dict[str, float]:
    """What one fleet-guarded policy's pooled evidence could tell (module docstring).

    Args:
        diffs: [M] gain differences of every evidence click of the replay.
        request_clicks: [R] evidence clicks pooled before each request (every device's).
        accepted: [R] the guard's verdicts.

    Returns:
        clicks (M), gain_per_click (m), sd_per_click (sd, n - 1), clicks_to_sign
        (n* = (sd / m)^2; inf when m is 0 or there are fewer than 2 clicks), sign_share
        (n* / M), requests_before /
        requests_after (requests made with fewer / at least n* clicks pooled) and
        applied_before / applied_after (the share of those the guard applied; NaN when
        there are none).
    """
    n_clicks = len(diffs)
    mean = float(np.mean(diffs)) if n_clicks else float("nan")
    sd = float(np.std(diffs, ddof=1)) if n_clicks > 1 else float("nan")
    n_sign = (sd / mean) ** 2 if n_clicks > 1 and mean != 0 else float("inf")
    before = request_clicks < n_sign

    def share(mask: np.ndarray) -> float:
        return float(accepted[mask].mean()) if mask.any() else float("nan")

    return {
        "clicks": n_clicks,
        "gain_per_click": mean,
        "sd_per_click": sd,
        "clicks_to_sign": n_sign,
        "sign_share": n_sign / n_clicks if n_clicks else float("nan"),
        "requests_before": int(before.sum()),
        "requests_after": int((~before).sum()),
        "applied_before": share(before),
        "applied_after": share(~before),
    }


def apply_fleet_guards(
    results: Sequence[UserResult],
    config: GuardConfig,
    proof: Collection[str] = (),
    levels: Mapping[str, float] | None = None,
) -> dict[str, dict[str, float]]:
    """Decide every fleet-guarded request on the pooled evidence before it and rewrite
    those policies' records and guard counts in ``results`` (in place). Labels in
    ``proof`` use the opt-in test (apply only proven-helpful edits); ``levels`` gives
    some labels their own test level z (standard errors) instead of ``config.z``.

    Returns:
        per fleet-guarded label, :func:`fleet_evidence_figures`.
    """
    labels = sorted({label for r in results for label in r.guard_inputs})
    figures = {}
    for label in labels:
        test_cfg = config
        if levels and label in levels:
            test_cfg = dataclasses.replace(config, z=levels[label])
        parts = [r for r in results if label in r.guard_inputs]
        ins = [r.guard_inputs[label] for r in parts]
        ts = np.concatenate([x["ts"] for x in ins])  # [N]
        had = np.concatenate([x["had"] for x in ins])
        diff = np.where(had, np.concatenate([x["diff"] for x in ins]), 0.0)
        order = np.argsort(ts, kind="stable")
        sts = ts[order]
        cs = np.concatenate([[0.0], np.cumsum(diff[order])])  # [N + 1] pooled sums
        cq = np.concatenate([[0.0], np.cumsum(diff[order] ** 2)])
        cn = np.concatenate([[0], np.cumsum(had[order])])
        if label in proof:
            device = np.concatenate([np.full(len(x["ts"]), i) for i, x in enumerate(ins)])
            c_ss, c_sn, c_nn = _clustered_sums(device[order], diff[order], had[order])
        seen_clicks, verdicts = [], []
        for r, x in zip(parts, ins, strict=True):
            k = np.searchsorted(sts, x["request_ts"], side="left")  # clicks strictly before
            t0 = time.perf_counter()
            if label in proof:
                n = np.maximum(cn[k], 1)
                mean = cs[k] / n
                var = (c_ss[k] - 2 * mean * c_sn[k] + mean**2 * c_nn[k]) / n**2
                accepted = np.asarray(benefit_test(cs[k], cn[k], var, test_cfg), dtype=bool)
            else:
                accepted = np.asarray(harm_test(cs[k], cq[k], cn[k], test_cfg), dtype=bool)  # [R]
            us = (time.perf_counter() - t0) * 1e6 / max(len(k), 1)
            use = x["had"] & accepted[np.maximum(x["served"], 0)]
            rec = r.records[label]
            r.records[label] = dataclasses.replace(
                rec,
                rank=np.where(use, x["rank"], x["base_rank"]),
                auc=np.where(use, x["auc"], x["base_auc"]),
            )
            acc = r.costs[label]
            acc.guard_accepted += int(accepted.sum())
            acc.guard_rejected += int((~accepted).sum())
            acc.guard_us.extend([us] * len(k))
            seen_clicks.append(cn[k])
            verdicts.append(accepted)
        figures[label] = fleet_evidence_figures(
            diff[order][had[order]], np.concatenate(seen_clicks), np.concatenate(verdicts)
        )
    return figures
