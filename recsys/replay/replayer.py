"""One device's replay through every policy: request points, edits, scoring.

:class:`Replayer` holds what a process needs (ranker, generators, LM token source,
prototype bank, gates) and replays one device at a time (:meth:`Replayer.replay_user`):

1. **Request points.** Each policy's trigger (:mod:`recsys.replay.policies`) runs over
   the device's histories; triggers see histories only, never edits, so every request
   point is known first. Policies with the same trigger share them.
2. **Edits**, batched over the device's request points, each built from the history the
   request was made from (never from the target it will serve):

   * system: codebook-LM tokens (the adaptor artefact's token source: the transformers
     backend in process) + device summary -> adaptor forward -> nearest prototype
     (bank FROZEN at the artefact's version 1: no online refinement during replay, so a
     device's edits depend on its own events only) -> bounded residual -> RSE1 payload.
     On the device: decode, compose with the prototype edit (downloaded once per
     prototype), validate and materialise (``Ranker.prepare``);
   * duet: the DUET-style generator from the raw recent item ids -> payload -> device;
   * finetune: :func:`device_ranker.finetune.finetune_head` on the device's history.

   An edit is computed once per request point and kind, shared by the policies that
   request there.
3. **Scoring**, batched: user states of every evaluated event's history (once), then per
   policy the head with per-event weights (``head_forward_per_user``), full-catalogue
   scores, the target's rank with the history excluded (pessimistic ties) and its AUC
   against the event's sampled negatives.

All batches are per device, so a device's results do not depend on the other devices.

Shapes: R request points, E evaluated events, D ranker width, I items, M negatives.

Example::

    rep = Replayer(art_path, cache, "ml-100k", ReplayConfig(), specs, calibrations)
    result = rep.replay_user(stream.user_events(42))
    result.records["system gate 20%"].rank, result.costs["finetune every 5"].requests
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codebook.adaptor import GeneratedEdit, head_spec, unbatch
from codebook.prototypes import nearest_prototype, prototype_edits, residual_edit
from device_ranker.edits import HeadEdit, PreparedEdit, prepare_edit
from device_ranker.features import seen_mask
from device_ranker.finetune import UNBOUNDED, finetune_head
from device_ranker.gate import ShiftGate
from device_ranker.head import head_forward_per_user
from device_ranker.ranker import Ranker
from recsys.edit_payload import decode_payload, encode_payload
from recsys.metrics import sampled_auc, target_ranks
from recsys.replay.config import PolicySpec, ReplayConfig
from recsys.replay.costs import CostAccumulator, apply_flops, uplink_bytes
from recsys.replay.gate_calibration import GateCalibration
from recsys.replay.policies import (
    TriggerKey,
    gate_requests,
    serving_request,
    timer_requests,
    trigger_key,
    triggered_by,
)
from recsys.replay.records import EventRecords
from recsys.replay.stream import UserEvents
from recsys.workflows.adaptor_data import (
    device_bounds,
    device_summary,
    recent_items,
    resolve_token_source,
)
from recsys.workflows.adaptor_training import (
    config_from_dict,
    generators_from_artifact,
    load_artifact,
    load_semantic_ids,
)

logger = logging.getLogger(__name__)


@dataclass
class DeviceEdit:
    """One request's result on the device (shared by the policies requesting there).

    ``device_us`` = ``decode_us`` (payload decode + compose) + ``apply_us`` (validate +
    materialise; for fine-tuning: the whole update).
    """

    prepared: PreparedEdit
    decode_us: float
    apply_us: float
    device_flops: float
    device_peak_bytes: float = 0.0
    uplink_bytes: float = 0.0
    payload_bytes: float = 0.0
    cloud_ms: float = 0.0
    prototype: int | None = None


@dataclass
class UserResult:
    """One device's records and costs, per policy label."""

    user: int
    records: dict[str, EventRecords]
    costs: dict[str, CostAccumulator] = field(default_factory=dict)


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
        self.tcfg = tcfg = config_from_dict(art["config"])
        self.rank = tcfg.rank
        self.ranker = Ranker.from_checkpoint(
            art["ranker_path"], bounds=device_bounds(art["bounds"], tcfg.rank)
        )
        model = self.ranker.model
        self.spec = self.ranker.edit_spec()
        self.item_table = model.item_table.detach()
        self.base_weights = model.head.base_weights()
        self.num_items = self.ranker.num_items
        self.summary_dim = 2 * int(self.item_table.shape[1])
        self.adaptor, self.duet = generators_from_artifact(art)
        self.keys = {s.label: trigger_key(s) for s in self.specs}
        self.tokens = None
        if any(s.kind == "system" for s in self.specs):
            ids = load_semantic_ids(cache, dataset)
            self.tokens = resolve_token_source(
                art["token_source"],
                ids,
                tcfg.windows.input_items,
                cache / "artifacts" / dataset / "lm",
                tcfg.lm_backend,
            )
            self._load_prototypes(art)
        vectors = self.item_table.numpy()
        self.gates = {
            b: ShiftGate(c.gate_config(), item_vectors=vectors) for b, c in calibrations.items()
        }
        self._ft_measured: dict[int, tuple[int, int]] = {}

    def _load_prototypes(self, art: dict[str, Any]) -> None:
        """The frozen prototype bank: cloud edits, payloads, device-side decode time."""
        b = art["bounds"]
        self.bound, self.bias_bound = b["device_max_weight_norm"], b["device_max_bias_abs"]
        self.pcfg = self.tcfg.prototypes
        self.centroids = art["prototype_centroids"].numpy().astype(np.float32)  # [P, C]
        self.hspec = head_spec(self.spec)
        self.proto_flat = prototype_edits(
            self.adaptor.decode, self.centroids, self.hspec, self.pcfg, self.bound, self.bias_bound
        )
        self.proto_edit: list[HeadEdit] = []
        self.proto_bytes: list[int] = []
        self.proto_us: list[float] = []
        for k, flat in enumerate(self.proto_flat):
            data = encode_payload(flat, dtype=self.cfg.payload_dtype, prototype=(k + 1, 1))
            t0 = time.perf_counter()
            payload = decode_payload(data, spec=self.spec, max_rank=2 * self.rank)
            self.proto_edit.append(HeadEdit.from_flat(payload.tensors))
            self.proto_us.append((time.perf_counter() - t0) * 1e6)
            self.proto_bytes.append(len(data))

    def close(self) -> None:
        if self.tokens is not None:
            self.tokens.close()

    # ---- request points ------------------------------------------------------------------
    def request_lengths(self, key: TriggerKey, seq: np.ndarray, start_len: int) -> np.ndarray:
        """History lengths [R] of the requests of trigger ``key`` over one device."""
        kind, value = key
        if kind == "timer":
            return timer_requests(len(seq), start_len, int(value), self.cfg.min_history)
        return gate_requests(self.gates[value], seq, start_len)

    # ---- device states -------------------------------------------------------------------
    def states(self, seq: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        """User states [K, D] of the histories ``seq[:L]`` for each L in ``lengths`` [K]."""
        bs = self.cfg.batch_size
        hists = [seq[:L] for L in lengths]
        parts = [self.ranker.user_states(hists[i : i + bs]) for i in range(0, len(hists), bs)]
        return torch.cat(parts) if parts else torch.zeros(0, self.item_table.shape[1])

    # ---- edits ------------------------------------------------------------------------------
    def _generate(
        self, kind: str, hists: list[np.ndarray], states: torch.Tensor
    ) -> tuple[GeneratedEdit, float]:
        """Cloud: the generator's edits for R histories (states [R, D]) and ms per request."""
        with torch.inference_mode():
            summary = device_summary(
                self.item_table, hists, states, self.tcfg.windows.summary_items
            )  # [R, 2D]
            t0 = time.perf_counter()
            if kind == "system":
                codes, scores = [], []
                # the cloud sees what the device uplinks: its last ``uplink_items`` items
                sent = [h[-self.cfg.uplink_items :] for h in hists]
                for i in range(0, len(sent), self.cfg.lm_batch):
                    c, s = self.tokens(sent[i : i + self.cfg.lm_batch])  # [r, N, L+1], [r, N]
                    codes.append(c)
                    scores.append(s)
                sc = None if scores[0] is None else torch.from_numpy(np.concatenate(scores))
                gen = self.adaptor(torch.from_numpy(np.concatenate(codes)), sc, summary)
            else:
                recent = recent_items(hists, self.tcfg.windows.input_items)  # [R, N]
                gen = self.duet(torch.from_numpy(recent), None, summary)
        return gen, (time.perf_counter() - t0) * 1e3 / max(len(hists), 1)

    def cloud_edits(
        self, kind: str, seq: np.ndarray, lengths: np.ndarray, states: torch.Tensor
    ) -> dict[int, DeviceEdit]:
        """System or DUET edits for the request points ``lengths`` [R] (states [R, D]),
        through the payload to the device."""
        if len(lengths) == 0:
            return {}
        hists = [seq[:L] for L in lengths.tolist()]
        gen, gen_ms = self._generate(kind, hists, states)
        pids = nearest_prototype(gen.code.numpy(), self.centroids) if kind == "system" else None
        out = {}
        for r, length in enumerate(lengths.tolist()):
            tc = time.perf_counter()  # cloud: residual against the prototype, encode
            flat = unbatch(gen.tensors, r)
            proto = None
            if pids is not None:
                proto = int(pids[r])
                rho = self.pcfg.residual_share
                flat, _ = residual_edit(
                    flat,
                    self.proto_flat[proto],
                    self.hspec,
                    rank=self.pcfg.residual_rank,
                    bound=rho * self.bound,
                    bias_bound=rho * self.bias_bound,
                )
            ref = None if proto is None else (proto + 1, 1)
            data = encode_payload(flat, dtype=self.cfg.payload_dtype, prototype=ref)
            cloud_ms = gen_ms + (time.perf_counter() - tc) * 1e3
            t0 = time.perf_counter()  # device: decode (+ compose), then validate + materialise
            payload = decode_payload(data, spec=self.spec, max_rank=2 * self.rank)
            edit = HeadEdit.from_flat(payload.tensors)
            if proto is not None:
                edit = HeadEdit.compose(self.proto_edit[proto], edit)
            t1 = time.perf_counter()
            prepared = self.ranker.prepare(edit)
            t2 = time.perf_counter()
            out[length] = DeviceEdit(
                prepared=prepared,
                decode_us=(t1 - t0) * 1e6,
                apply_us=(t2 - t1) * 1e6,
                device_flops=apply_flops(edit, self.spec),
                device_peak_bytes=_weights_bytes(prepared),
                uplink_bytes=uplink_bytes(
                    length, self.cfg.uplink_items, self.summary_dim, proto is not None
                ),
                payload_bytes=len(data),
                cloud_ms=cloud_ms,
                prototype=proto,
            )
        return out

    def finetune_edits(self, seq: np.ndarray, lengths: np.ndarray) -> dict[int, DeviceEdit]:
        """On-device fine-tuning at each request point; FLOPs and peak memory measured once
        per number of training positions (all they depend on), wall time every time."""
        model = self.ranker.model
        steps, lr = self.cfg.finetune_steps, self.cfg.finetune_lr
        out = {}
        for length in lengths.tolist():
            hist = seq[:length]
            res = finetune_head(model, hist, steps=steps, lr=lr, measure=False)
            if res.positions not in self._ft_measured:
                with quiet_native_stderr():  # torch's profiler logs every start / stop
                    m = finetune_head(model, hist, steps=steps, lr=lr)
                self._ft_measured[res.positions] = (int(m.flops or 0), int(m.peak_bytes or 0))
            flops, peak = self._ft_measured[res.positions]
            t0 = time.perf_counter()
            prepared = prepare_edit(model.head, res.edit, UNBOUNDED)
            apply_us = res.wall_ms * 1e3 + (time.perf_counter() - t0) * 1e6
            out[length] = DeviceEdit(
                prepared=prepared,
                decode_us=0.0,
                apply_us=apply_us,
                device_flops=flops + apply_flops(res.edit, self.spec),
                device_peak_bytes=peak,
            )
        return out

    # ---- one device ------------------------------------------------------------------------
    def replay_user(self, ev: UserEvents) -> UserResult:
        """Every policy on one device's events (see the module docstring)."""
        seq, start = ev.sequence, len(ev.start)
        lengths = {k: self.request_lengths(k, seq, start) for k in set(self.keys.values()) if k}
        idx = np.flatnonzero(ev.evaluated)
        pos = ev.positions[idx]  # [E] history lengths of the evaluated events
        points: dict[str, set[int]] = {"system": set(), "duet": set(), "finetune": set()}
        for s in self.specs:
            if self.keys[s.label] is not None:
                points[s.kind].update(lengths[self.keys[s.label]].tolist())
        need = sorted(set(pos.tolist()) | points["system"] | points["duet"])
        states = self.states(seq, np.asarray(need, dtype=np.int64))  # [K, D]
        row = {L: i for i, L in enumerate(need)}

        def states_of(ls: Sequence[int]) -> torch.Tensor:
            return states[torch.tensor([row[L] for L in ls], dtype=torch.int64)]

        edits: dict[str, dict[int, DeviceEdit]] = {}
        for kind in ("system", "duet"):
            pts = np.array(sorted(points[kind]), dtype=np.int64)
            edits[kind] = self.cloud_edits(kind, seq, pts, states_of(pts.tolist()))
        edits["finetune"] = self.finetune_edits(
            seq, np.array(sorted(points["finetune"]), dtype=np.int64)
        )

        result = UserResult(user=ev.user, records={})
        targets = torch.from_numpy(ev.items[idx])
        negs = torch.from_numpy(ev.negatives[idx])
        hists = [seq[:p] for p in pos]
        ev_states = states_of(pos.tolist())  # [E, D]
        for s in self.specs:
            key = self.keys[s.label]
            ls = lengths[key] if key else np.zeros(0, dtype=np.int64)
            served = serving_request(ls, pos)  # [E] index into ls, -1 = base
            weights = [
                None if j < 0 else edits[s.kind][int(ls[j])].prepared.weights
                for j in served.tolist()
            ]
            rank, auc = self.score(ev_states, hists, targets, negs, weights)
            result.records[s.label] = EventRecords(
                user=np.full(len(idx), ev.user, dtype=np.int64),
                item=ev.items[idx],
                timestamp=ev.timestamps[idx],
                rank=rank,
                auc=auc,
                requested=triggered_by(ls, pos),
            )
            result.costs[s.label] = self._costs(ls, edits.get(s.kind, {}))
        return result

    def _costs(self, lengths: np.ndarray, edits: dict[int, DeviceEdit]) -> CostAccumulator:
        """One policy's costs on one device; a prototype is downloaded on its first use."""
        acc = CostAccumulator()
        held: set[int] = set()
        for n, length in enumerate(lengths.tolist()):
            e = edits[length]
            extra_us, extra_bytes = 0.0, 0
            if e.prototype is not None and e.prototype not in held:
                held.add(e.prototype)
                extra_us, extra_bytes = self.proto_us[e.prototype], self.proto_bytes[e.prototype]
                acc.prototype_downloads += 1
                acc.prototype_bytes += extra_bytes
            acc.add(
                decode_us=e.decode_us + extra_us,
                apply_us=e.apply_us,
                device_flops=e.device_flops,
                device_peak_bytes=e.device_peak_bytes,
                uplink_bytes=e.uplink_bytes,
                downlink_bytes=e.payload_bytes + extra_bytes,
                payload_bytes=e.payload_bytes,
                cloud_ms=e.cloud_ms,
                initial=n == 0,
            )
        return acc

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
        bs, base = self.cfg.batch_size, self.base_weights
        with torch.inference_mode():
            for a in range(0, len(hists), bs):
                b = min(a + bs, len(hists))
                x, ws = states[a:b], weights[a:b]  # [B, D]
                if all(w is None for w in ws):
                    q = model.head(x)
                else:
                    full = [base if w is None else w for w in ws]
                    stacked = [
                        (torch.stack([w[i][0] for w in full]), torch.stack([w[i][1] for w in full]))
                        for i in range(len(base))
                    ]  # per layer W [B, out, in], b [B, out]
                    q = head_forward_per_user(x, stacked, model.head.residual)  # [B, D]
                scores = model.item_scores(q)  # [B, I]
                tg = targets[a:b]
                ranks.append(target_ranks(scores, tg, seen_mask(hists[a:b], self.num_items)))
                pos = scores.gather(1, tg[:, None]).squeeze(1)  # [B]
                aucs.append(sampled_auc(pos, scores.gather(1, negatives[a:b])))  # [B]
        if not ranks:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        return torch.cat(ranks).numpy(), torch.cat(aucs).numpy()


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (native logging, e.g. kineto's profiler start / stop lines)
    for the block; Python exceptions still propagate."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _weights_bytes(prepared: PreparedEdit) -> int:
    return sum(
        w.numel() * w.element_size() + b.numel() * b.element_size() for w, b in prepared.weights
    )
