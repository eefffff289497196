"""The in-process replay driver: each device through every policy, batched per device.

:class:`Replayer` holds what a process needs (ranker, gates, the :class:`EditMaker` with
generators, token source and prototype bank) and replays one device at a time
(:meth:`Replayer.replay_user`), returning its :class:`~recsys.replay.records.UserResult`
(records and costs per policy, the same objects the gRPC driver returns):

1. **Request points.** Each policy's trigger (:mod:`recsys.replay.policies`) runs over
   the device's histories; triggers see histories only, never edits, so every request
   point is known first. Policies with the same trigger share them. The learned gate
   also reads the base model's rank of each click (:meth:`Replayer.base_click_ranks`,
   from histories only).
2. **Edits** (:mod:`recsys.replay.edits`), batched over the device's request points, once
   per request point and edit kind, shared by the policies that request there.
3. **Scoring**, batched: user states of every evaluated event's history (once), then per
   policy the head with per-event weights (:func:`device_ranker.head.queries_per_user`),
   full-catalogue scores, the target's rank with the history excluded (pessimistic
   ties) and its AUC against the event's sampled negatives. A guarded policy
   (:mod:`recsys.replay.guard`) then serves, per request, its edit or the base head.

All batches are per device, so a device's results do not depend on the other devices;
:func:`replay_devices` splits the devices across ``workers`` spawned processes, or
``workers`` Ray actors with ``cfg.ray`` (:mod:`recsys.replay.ray_backend`).

Shapes: R request points, E evaluated events, D ranker width, I items, M negatives.

Example::

    rep = Replayer(art_path, cache, "ml-100k", ReplayConfig(), specs, calibrations)
    result = rep.replay_user(stream.user_events(42))
    result.records["system gate 20%"].rank, result.costs["finetune every 5"].requests
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from codebook.adaptor_artifact import load_artifact
from device_ranker.features import seen_mask
from device_ranker.gate import GateConfig, ShiftGate
from device_ranker.guard import HarmGuard
from device_ranker.head import queries_per_user
from device_ranker.learned_gate import SINCE_CLICKS, LearnedGate, load_gate_model
from device_ranker.ranker import Ranker
from recsys.errors import ValidationError
from recsys.metrics import sampled_auc, target_ranks
from recsys.replay.config import LIVE_KINDS, NO_PROTOTYPES, REFINE, PolicySpec, ReplayConfig
from recsys.replay.edits import ADAPTOR_KINDS, DeviceEdit, EditMaker
from recsys.replay.gate_calibration import GateCalibration
from recsys.replay.guard import fleet_guard_inputs, guard_policy
from recsys.replay.policies import (
    TriggerKey,
    gate_requests,
    learned_requests,
    serving_request,
    timer_requests,
    trigger_key,
    triggered_by,
)
from recsys.replay.records import EventRecords, UserResult
from recsys.replay.stream import UserEvents
from recsys.workflows.adaptor_config import config_from_dict
from recsys.workflows.adaptor_data import device_bounds

logger = logging.getLogger(__name__)

EDIT_KINDS = ("system", NO_PROTOTYPES, REFINE, "duet", "finetune")  # made per device


@dataclass
class RequestPlan:
    """A device's request points: trigger -> history lengths [R] of its requests, and
    edit kind -> the lengths some policy of that kind requests at."""

    lengths: dict[TriggerKey, np.ndarray]
    points: dict[str, set[int]]


class Replayer:
    """Replays devices through every policy (see the module docstring).

    Args:
        art_path: the adaptor artefact; cache: the cache dir (codebook, LM).
        dataset: dataset name (artefact locations under the cache).
        cfg, specs: the protocol and the policies.
        calibrations: budget -> :class:`GateCalibration` of the gate policies.
    """

    def __init__(
        self,
        art_path: Path,
        cache: Path,
        dataset: str,
        cfg: ReplayConfig,
        specs: Sequence[PolicySpec],
        calibrations: dict[float, GateCalibration],
    ) -> None:
        self.cfg = cfg
        self.specs = list(specs)
        art = load_artifact(art_path)
        tcfg = config_from_dict(art["config"])
        self.ranker = Ranker.from_checkpoint(
            art["ranker_path"], bounds=device_bounds(art["bounds"], tcfg.rank)
        )
        self.num_items = self.ranker.num_items
        self.keys = {s.label: trigger_key(s) for s in self.specs}
        kinds = {s.edit_kind for s in self.specs if s.edit_kind}
        self.edits = EditMaker(art, Path(cache), dataset, cfg, self.ranker, kinds)
        self.guard = HarmGuard(cfg.guard)
        vectors = self.ranker.model.item_table.detach().numpy()
        self.gates = {
            b: ShiftGate(c.gate_config(), item_vectors=vectors) for b, c in calibrations.items()
        }
        self.learned: dict[float, LearnedGate] = {}
        learned = sorted({key[1] for key in self.keys.values() if key and key[0] == "learned"})
        if learned:
            if not cfg.learned_gate:
                raise ValidationError("learned policies need ReplayConfig.learned_gate")
            model = load_gate_model(cfg.learned_gate)
            for b in learned:
                gcfg = GateConfig(
                    budget=b,
                    window=cfg.gate_window,
                    min_history=cfg.min_history,
                    min_gap=cfg.gate_min_gap,
                )
                self.learned[b] = LearnedGate(model, gcfg, vectors)

    def close(self) -> None:
        self.edits.close()

    # ---- request points ------------------------------------------------------------------
    def request_lengths(
        self,
        key: TriggerKey,
        seq: np.ndarray,
        start_len: int,
        base_ranks: np.ndarray | None = None,
    ) -> np.ndarray:
        """History lengths [R] of the requests of trigger ``key`` over one device
        (``base_ranks`` [len(seq)]: :meth:`base_click_ranks`, for the learned gate)."""
        kind, value = key
        if kind == "timer":
            return timer_requests(len(seq), start_len, int(value), self.cfg.min_history)
        if kind == "learned":
            if base_ranks is None:
                raise ValidationError("the learned gate needs the base ranks of the clicks")
            return learned_requests(self.learned[value], seq, start_len, base_ranks)
        return gate_requests(self.gates[value], seq, start_len)

    def base_click_ranks(self, seq: np.ndarray, start_len: int) -> np.ndarray:
        """[len(seq)] float: the base model's rank of ``seq[p]`` given ``seq[:p]`` (seen
        items excluded, pessimistic ties) for every position the learned gate reads
        (from ``SINCE_CLICKS`` before the replay on); NaN elsewhere."""
        out = np.full(len(seq), np.nan)
        pos = np.arange(max(1, start_len - SINCE_CLICKS), len(seq), dtype=np.int64)
        if len(pos) == 0:
            return out
        hists = [seq[:p] for p in pos]
        states = self.history_states(hists)
        targets = torch.from_numpy(seq[pos])
        ranks = []
        bs = self.cfg.batch_size
        model = self.ranker.model
        with torch.inference_mode():
            for a in range(0, len(pos), bs):
                q = queries_per_user(model.head, states[a : a + bs], [None] * len(pos[a : a + bs]))
                scores = model.item_scores(q)  # [B, I]
                mask = seen_mask(hists[a : a + bs], self.num_items)
                ranks.append(target_ranks(scores, targets[a : a + bs], mask))
        out[pos] = torch.cat(ranks).numpy()
        return out

    # ---- device states -------------------------------------------------------------------
    def states(self, seq: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        """User states [K, D] of the histories ``seq[:L]`` for each L in ``lengths`` [K]."""
        return self.history_states([seq[:L] for L in lengths])

    def history_states(self, hists: Sequence[np.ndarray]) -> torch.Tensor:
        """User states [K, D] of K histories, in batches of ``cfg.batch_size``."""
        bs = self.cfg.batch_size
        parts = [self.ranker.user_states(hists[i : i + bs]) for i in range(0, len(hists), bs)]
        dim = self.ranker.model.item_table.shape[1]
        return torch.cat(parts) if parts else torch.zeros(0, dim)

    # ---- one device ------------------------------------------------------------------------
    def request_plan(self, ev: UserEvents) -> RequestPlan:
        """Step 1 for one device: every trigger's request lengths and, per edit kind, the
        lengths some policy of that kind requests at."""
        seq, start = ev.sequence, len(ev.start)
        keys = {k for k in self.keys.values() if k}
        ranks = self.base_click_ranks(seq, start) if any(k[0] == "learned" for k in keys) else None
        lengths = {k: self.request_lengths(k, seq, start, ranks) for k in keys}
        points: dict[str, set[int]] = {kind: set() for kind in (*EDIT_KINDS, *LIVE_KINDS)}
        for s in self.specs:
            if self.keys[s.label] is not None:
                points[s.edit_kind].update(lengths[self.keys[s.label]].tolist())
        return RequestPlan(lengths, points)

    def replay_user(
        self,
        ev: UserEvents,
        injected: Mapping[str, Mapping[int, DeviceEdit]] | None = None,
    ) -> UserResult:
        """Every policy on one device's events (see the module docstring). ``injected``:
        the edits of the global-time policies (:mod:`recsys.replay.global_time`), made
        outside the device (policy label -> history length -> edit)."""
        seq = ev.sequence
        plan = self.request_plan(ev)
        lengths, points = plan.lengths, plan.points
        idx = np.flatnonzero(ev.evaluated)
        pos = ev.positions[idx]  # [E] history lengths of the evaluated events
        cloud = set().union(*(points[k] for k in (*ADAPTOR_KINDS, "duet")))
        need = sorted(set(pos.tolist()) | cloud)
        states = self.states(seq, np.asarray(need, dtype=np.int64))  # [K, D]
        row = {L: i for i, L in enumerate(need)}

        def states_of(ls: Sequence[int]) -> torch.Tensor:
            return states[torch.tensor([row[L] for L in ls], dtype=torch.int64)]

        edits: dict[str, Mapping[int, DeviceEdit]] = {}
        for generator, kinds in (("adaptor", ADAPTOR_KINDS), ("duet", ("duet",))):
            variants = {k: points[k] for k in kinds if points[k]}
            pts = np.array(sorted(set().union(*variants.values())), dtype=np.int64)
            edits |= self.edits.cloud_edits(generator, seq, pts, states_of(pts.tolist()), variants)
        edits["finetune"] = self.edits.finetune_edits(
            seq, np.array(sorted(points["finetune"]), dtype=np.int64)
        )
        missing = [s.label for s in self.specs if s.global_time and s.label not in (injected or {})]
        if missing:
            raise ValidationError(
                f"{missing} need the global-time replay (their edits depend on other devices' "
                "earlier requests); run them through run_replay"
            )

        result = UserResult(user=ev.user, records={})
        targets = torch.from_numpy(ev.items[idx])
        negs = torch.from_numpy(ev.negatives[idx])
        hists = [seq[:p] for p in pos]
        ev_states = states_of(pos.tolist())  # [E, D]
        scored: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}  # shared by guarded twins
        base = None
        if any(s.guard for s in self.specs):
            base = self.score(ev_states, hists, targets, negs, [None] * len(pos))
        for s in self.specs:
            key = self.keys[s.label]
            ls = lengths[key] if key else np.zeros(0, dtype=np.int64)
            mine = injected[s.label] if s.global_time else edits.get(s.edit_kind or "", {})
            served = serving_request(ls, pos)  # [E] index into ls, -1 = base
            twin = (key, s.edit_kind, s.label if s.global_time else None)
            if twin not in scored:
                weights = [
                    None if j < 0 else mine[int(ls[j])].prepared.weights for j in served.tolist()
                ]
                scored[twin] = self.score(ev_states, hists, targets, negs, weights)
            rank, auc = scored[twin]
            costs = self.edits.costs(ls, mine)
            if s.fleet_guard and base is not None:  # decided later, over every device
                result.guard_inputs[s.label] = fleet_guard_inputs(
                    ev, ls, pos, served, (rank, auc), base
                )
            elif s.guard and base is not None:
                rank, auc = guard_policy(self.guard, ls, pos, served, (rank, auc), base, costs)
            result.records[s.label] = EventRecords(
                user=np.full(len(idx), ev.user, dtype=np.int64),
                item=ev.items[idx],
                timestamp=ev.timestamps[idx],
                rank=rank,
                auc=auc,
                requested=triggered_by(ls, pos),
            )
            result.costs[s.label] = costs
        return result

    def score(
        self,
        states: torch.Tensor,
        hists: list[np.ndarray],
        targets: torch.Tensor,
        negatives: torch.Tensor,
        weights: list,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Ranks [E] and AUCs [E] of the targets [E] given states [E, D], negatives [E, M]
        and per-event head weights (None = the base head)."""
        model = self.ranker.model
        ranks, aucs = [], []
        bs = self.cfg.batch_size
        with torch.inference_mode():
            for a in range(0, len(hists), bs):
                b = min(a + bs, len(hists))
                q = queries_per_user(model.head, states[a:b], weights[a:b])  # [B, D]
                scores = model.item_scores(q)  # [B, I]
                tg = targets[a:b]
                ranks.append(target_ranks(scores, tg, seen_mask(hists[a:b], self.num_items)))
                pos = scores.gather(1, tg[:, None]).squeeze(1)  # [B]
                aucs.append(sampled_auc(pos, scores.gather(1, negatives[a:b])))  # [B]
        if not ranks:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        return torch.cat(ranks).numpy(), torch.cat(aucs).numpy()


# ---- the devices, in this process or in spawned workers ------------------------------------
ReplayerArgs = tuple[Path, Path, str, ReplayConfig, list[PolicySpec], dict[float, GateCalibration]]
_WORKER: Replayer | None = None


def _init_worker(args: ReplayerArgs) -> None:
    global _WORKER
    torch.set_num_threads(1)
    _WORKER = Replayer(*args)


def _run_chunk(chunk: list[UserEvents]) -> list[UserResult]:
    if _WORKER is None:
        raise RuntimeError("replay worker used before its initialiser ran")
    return [_WORKER.replay_user(ev) for ev in chunk]


def replay_devices(
    args: ReplayerArgs, events: list[UserEvents], *, progress: bool = True
) -> list[UserResult]:
    """Every device of ``events`` through a :class:`Replayer` built from ``args``; results
    in the order of ``events``.

    Devices are cut into fixed blocks of ``cfg.chunk_users`` (in order) that
    ``cfg.workers`` spawned processes (one torch thread each) take in turn; a device's
    result does not depend on the block it is in, so results are identical for any
    worker count. With ``cfg.ray`` set, ``cfg.workers`` Ray actors take the blocks
    instead (:func:`recsys.replay.ray_backend.replay_on_ray`), with the same results.
    """
    cfg = args[3]
    chunks = [events[i : i + cfg.chunk_users] for i in range(0, len(events), cfg.chunk_users)]
    results: list[UserResult] = []
    workers = min(cfg.workers, len(chunks))
    with tqdm(total=len(events), desc="replay", unit="device", disable=not progress) as bar:
        if cfg.ray is not None and chunks:
            from recsys.replay.ray_backend import replay_on_ray

            results = replay_on_ray(
                args, chunks, address=cfg.ray, workers=cfg.workers, on_done=bar.update
            )
        elif workers <= 1:
            rep = Replayer(*args)
            try:
                for ev in events:
                    results.append(rep.replay_user(ev))
                    bar.update(1)
            finally:
                rep.close()
        else:
            with mp.get_context("spawn").Pool(
                workers, initializer=_init_worker, initargs=(args,)
            ) as pool:
                for part in pool.imap(_run_chunk, chunks):
                    results.extend(part)
                    bar.update(len(part))
                pool.close()  # let the workers exit on their own (no terminate)
                pool.join()
    return results
