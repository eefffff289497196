"""The edits of the in-process replay: what each request point of a device gets.

:class:`EditMaker` builds, batched over one device's request points and each from the
history the request was made from (never from the target it will serve):

* **system** (full system): the adaptor artefact's tokens (semantic IDs from the
  uplink windows: the artefact's LM, ``lm_dir``, through its backend in process, the
  recent-items stand-in, or none at all for the summary-only ablation)
  + device summary -> adaptor forward -> nearest prototype (bank FROZEN at the
  artefact's version 1: no online refinement during replay, so a device's edits depend
  on its own events only) -> bounded residual -> RSE1 payload. On the device, as the
  device service does it: decode (``decode_values``), compose with the prototype edit
  (downloaded once per prototype), validate and build the factored head weights
  (``Ranker.prepare_decoded``);
* **system-noproto**: the same adaptor edit, sent whole (no prototype);
* **duet**: the DUET-style generator from the raw recent item ids -> payload -> device;
* **finetune**: :func:`device_ranker.finetune.finetune_head` on the device's history.

The two adaptor kinds share one generation per request point. :meth:`EditMaker.costs`
turns a policy's edits into its :class:`~recsys.replay.costs.CostAccumulator`.

Shapes: R request points, D ranker width, N input items, L+1 semantic-ID levels.

Example::

    maker = EditMaker(art, cache, "ml-100k", cfg, ranker, kinds={"system", "finetune"})
    edits = maker.cloud_edits("adaptor", seq, lengths, states, {"system": set(lengths)})
    edits["system"][12].prepared.weights, maker.costs(lengths, edits["system"]).summary(40)
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codebook.adaptor import GeneratedEdit, head_spec, unbatch
from codebook.adaptor_artifact import artifact_lm_dir, generators_from_artifact, load_semantic_ids
from codebook.prototypes import nearest_prototype, prototype_edits, residual_edit
from codebook.refine import HeadTensors, refine_edits
from device_ranker.edit_apply import PreparedEdit, prepare_edit
from device_ranker.edits import HeadEdit
from device_ranker.finetune import UNBOUNDED, finetune_head
from device_ranker.ranker import Ranker
from recsys.adaptor_inputs import (
    device_summary,
    recent_items,
    summary_width,
    uplink_window,
)
from recsys.edit_payload import decode_payload, decode_values, encode_payload
from recsys.replay.config import CONTINUAL, LIVE_KINDS, NO_PROTOTYPES, REFINE, ReplayConfig
from recsys.replay.costs import (
    CostAccumulator,
    apply_flops,
    event_flops,
    refine_uplink_bytes,
    uplink_bytes,
)
from recsys.workflows.adaptor_config import config_from_dict
from recsys.workflows.adaptor_data import resolve_token_source

logger = logging.getLogger(__name__)

ADAPTOR_KINDS = ("system", NO_PROTOTYPES, REFINE)  # edit kinds made by the adaptor


@dataclass
class DeviceEdit:
    """One request's result on the device (shared by the policies requesting there).

    ``device_us`` = ``decode_us`` (payload decode) + ``apply_us`` (compose, validate,
    factored head weights; for fine-tuning: the whole update). ``device_flops`` counts
    the update; ``event_flops`` the extra FLOPs of each event the edit then scores
    (factored layers), up to ``stream_len``, the device's history length at its last
    event (None when unknown: then the device's last request counts one event).
    """

    prepared: PreparedEdit
    decode_us: float
    apply_us: float
    device_flops: float
    event_flops: float = 0.0
    stream_len: int | None = None
    device_peak_bytes: float = 0.0
    uplink_bytes: float = 0.0
    payload_bytes: float = 0.0
    cloud_ms: float = 0.0
    prototype: tuple[int, int] | None = None  # (id, version) the edit is a residual against
    residual_norm: float = 0.0


@dataclass
class ProtoEdit:
    """One prototype version as both sides hold it: ``flat`` (cloud, unbatched) and
    ``edit`` (device, decoded from its ``payload_bytes`` download in ``decode_us``)."""

    key: tuple[int, int]  # (prototype id, version)
    flat: dict[str, torch.Tensor]
    edit: HeadEdit
    payload_bytes: int
    decode_us: float


class EditMaker:
    """Builds the edits of a device's request points (see the module docstring).

    Args:
        art: the loaded adaptor artefact; cache, dataset: where its codebook / LM live.
        cfg: the protocol (uplink, payload dtype, LM batch, fine-tuning steps).
        ranker: the device ranker (with the artefact's edit bounds).
        kinds: the edit kinds the replay's policies use (loads only what they need).
    """

    def __init__(
        self,
        art: Mapping[str, Any],
        cache: Path,
        dataset: str,
        cfg: ReplayConfig,
        ranker: Ranker,
        kinds: set[str],
    ) -> None:
        self.cfg = cfg
        self.art = art
        self.tcfg = tcfg = config_from_dict(art["config"])
        self.rank = tcfg.rank
        self.ranker = ranker
        self.spec = ranker.edit_spec()
        self.item_table = ranker.model.item_table.detach()
        self.summary_dim = summary_width(int(self.item_table.shape[1]))
        self.adaptor, self.duet = generators_from_artifact(art)
        self.tokens = None
        # item ids an adaptor request uplinks: none when the adaptor reads no tokens
        self.adaptor_uplink_items = 0 if art["token_source"] == "none" else cfg.uplink_items
        if kinds & {*ADAPTOR_KINDS, *LIVE_KINDS}:
            ids = load_semantic_ids(cache, dataset)
            self.codes = ids.codes  # [I, L+1]
            self.tokens = resolve_token_source(
                art["token_source"],
                ids,
                tcfg.windows.input_items,
                artifact_lm_dir(art, cache, dataset),
                tcfg.lm_backend,
            )
        self._protos: dict[tuple[int, int], ProtoEdit] = {}
        if kinds & {"system", *LIVE_KINDS}:
            self._load_prototypes(art)
        if kinds & {REFINE, CONTINUAL}:
            model = ranker.model
            layers = zip(model.head.layer_names(), model.head.base_weights(), strict=True)
            self.head = HeadTensors.from_weights(
                [(n, w, b) for n, (w, b) in layers],
                residual=model.head.residual,
                item_table=model.item_table,
                item_bias=model.item_bias,
            )
            # refined edits are clipped like the generators' (a margin for payload rounding)
            b = art["bounds"]
            self.refine_bounds = (b["generator_max_weight_norm"], b["generator_max_bias_abs"])
        self._ft_measured: dict[int, tuple[int, int]] = {}

    def _load_prototypes(self, art: Mapping[str, Any]) -> None:
        """The frozen prototype bank (ids 1..P at version 1, as a fresh store numbers
        them): cloud edits, payloads, device-side decode time."""
        b = art["bounds"]
        self.bound, self.bias_bound = b["device_max_weight_norm"], b["device_max_bias_abs"]
        self.pcfg = self.tcfg.prototypes
        self.centroids = art["prototype_centroids"].numpy().astype(np.float32)  # [P, C]
        self.hspec = head_spec(self.spec)
        flats = prototype_edits(
            self.adaptor.decode, self.centroids, self.hspec, self.pcfg, self.bound, self.bias_bound
        )
        self.frozen_protos = [self.prototype((k + 1, 1), f) for k, f in enumerate(flats)]

    def prototype(self, key: tuple[int, int], flat: Mapping[str, torch.Tensor]) -> ProtoEdit:
        """The prototype edit ``flat`` at ``key`` = (id, version) as both sides hold it:
        the cloud's flat edit and the device's decoded copy with its download cost
        (cached per key: a device downloads each version once)."""
        if key not in self._protos:
            data = encode_payload(dict(flat), dtype=self.cfg.payload_dtype, prototype=key)
            t0 = time.perf_counter()
            payload = decode_payload(data, spec=self.spec, max_rank=2 * self.rank)
            edit = HeadEdit.from_flat(payload.tensors)
            us = (time.perf_counter() - t0) * 1e6
            self._protos[key] = ProtoEdit(key, dict(flat), edit, len(data), us)
        return self._protos[key]

    def close(self) -> None:
        if self.tokens is not None:
            self.tokens.close()

    # ---- cloud edits ------------------------------------------------------------------------
    def summaries(self, hists: list[np.ndarray], states: torch.Tensor) -> torch.Tensor:
        """Device summaries [R, 2D] of R histories with their user states [R, D]."""
        with torch.inference_mode():
            return device_summary(self.item_table, hists, states, self.tcfg.windows.summary_items)

    def adaptor_tokens(self, hists: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """Cloud: the adaptor's tokens [R, N, L+1] (and scores [R, N] or None) of R
        histories: the device uplinks its last ``uplink_items`` items; the tokens read the
        window the adaptor was trained on (as llm_cloud's engine does)."""
        read = self.tcfg.windows.uplink_items
        sent = [uplink_window(uplink_window(h, self.cfg.uplink_items), read) for h in hists]
        codes, scores = [], []
        for i in range(0, len(sent), self.cfg.lm_batch):
            c, s = self.tokens(sent[i : i + self.cfg.lm_batch])  # [r, N, L+1], [r, N]
            codes.append(c)
            scores.append(s)
        return np.concatenate(codes), None if scores[0] is None else np.concatenate(scores)

    def _generate(
        self, generator: str, hists: list[np.ndarray], states: torch.Tensor
    ) -> tuple[GeneratedEdit, float]:
        """Cloud: ``generator``'s ("adaptor" | "duet") edits for R histories (states
        [R, D]) and ms per request."""
        summary = self.summaries(hists, states)  # [R, 2D]
        t0 = time.perf_counter()
        with torch.inference_mode():
            if generator == "adaptor":
                codes, scores = self.adaptor_tokens(hists)
                sc = None if scores is None else torch.from_numpy(scores)
                gen = self.adaptor(torch.from_numpy(codes), sc, summary)
            else:
                recent = recent_items(hists, self.tcfg.windows.input_items)  # [R, N]
                gen = self.duet(torch.from_numpy(recent), None, summary)
        return gen, (time.perf_counter() - t0) * 1e3 / max(len(hists), 1)

    def cloud_edits(
        self,
        generator: str,
        seq: np.ndarray,
        lengths: np.ndarray,
        states: torch.Tensor,
        variants: Mapping[str, set[int]],
    ) -> dict[str, dict[int, DeviceEdit]]:
        """``generator``'s ("adaptor" | "duet") edits at the request points ``lengths``
        [R] (history lengths, states [R, D]), through the payload to the device, once per
        edit kind of ``variants`` (kind -> the lengths it requests at)."""
        out: dict[str, dict[int, DeviceEdit]] = {kind: {} for kind in variants}
        if len(lengths) == 0:
            return out
        hists = [seq[:L] for L in lengths.tolist()]
        gen, gen_ms = self._generate(generator, hists, states)
        pids = nearest_prototype(gen.code.numpy(), self.centroids) if "system" in variants else None
        protos = self.frozen_protos if pids is not None else []
        refined: dict[int, dict[str, torch.Tensor]] = {}
        refine_ms = 0.0
        if REFINE in variants:
            rows = [r for r, L in enumerate(lengths.tolist()) if L in variants[REFINE]]
            refined, refine_ms = self._refine(gen, hists, rows)
        for r, length in enumerate(lengths.tolist()):
            for kind, points in variants.items():
                if length in points:
                    proto = protos[int(pids[r])] if kind == "system" and pids is not None else None
                    if kind == REFINE:
                        out[kind][length] = self._deliver(
                            refined[r],
                            length,
                            gen_ms + refine_ms,
                            None,
                            states_uplinked=True,
                            adaptor=True,
                        )
                    else:
                        flat = unbatch(gen.tensors, r)
                        out[kind][length] = self._deliver(
                            flat, length, gen_ms, proto, adaptor=generator == "adaptor"
                        )
                    out[kind][length].stream_len = len(seq)
        return out

    def _refine(
        self, gen: GeneratedEdit, hists: list[np.ndarray], rows: list[int]
    ) -> tuple[dict[int, dict[str, torch.Tensor]], float]:
        """Cloud: the adaptor's edits of requests ``rows`` refined on each history's last
        ``refine.positions`` positions (:func:`codebook.refine.refine_edits`, batched over
        the rows); returns row -> unbatched flat edit and the ms per request."""
        t0 = time.perf_counter()
        cfg = self.cfg.refine
        prefixes, slots, targets = [], [], np.full((len(rows), cfg.positions), -1, np.int64)
        for j, r in enumerate(rows):  # R requests x P positions: histories to encode
            h = hists[r]
            for k, p in enumerate(range(max(1, len(h) - cfg.positions), len(h))):
                prefixes.append(h[:p])
                slots.append((j, k))
                targets[j, k] = h[p]
        dim = int(self.item_table.shape[1])
        states = torch.zeros(len(rows), cfg.positions, dim)  # [R, P, D]
        bs = self.cfg.batch_size
        for a in range(0, len(prefixes), bs):
            part = self.ranker.user_states(prefixes[a : a + bs])  # [b, D]
            js, ks = zip(*slots[a : a + bs], strict=True)
            states[list(js), list(ks)] = part
        sel = torch.tensor(rows, dtype=torch.int64)
        tensors = {k: v[sel] for k, v in gen.tensors.items()}
        bound, bias_bound = self.refine_bounds
        out = refine_edits(
            self.head, tensors, states, torch.from_numpy(targets), cfg,
            bound=bound, bias_bound=bias_bound,
        )  # fmt: skip
        ms = (time.perf_counter() - t0) * 1e3 / max(len(rows), 1)
        return {r: unbatch(out, j) for j, r in enumerate(rows)}, ms

    def _deliver(
        self,
        flat: dict[str, torch.Tensor],
        length: int,
        gen_ms: float,
        proto: ProtoEdit | None,
        *,
        states_uplinked: bool = False,
        adaptor: bool = False,
    ) -> DeviceEdit:
        """One request's edit ``flat``: cloud residual against prototype ``proto`` (None:
        the whole edit) and encoding; device decode, then compose, validate and build the
        factored head weights.
        ``states_uplinked``: the request also carried the device's recent states (refine);
        ``adaptor``: an adaptor request (it uplinks no items when the adaptor reads no
        tokens)."""
        tc = time.perf_counter()  # cloud: residual against the prototype, encode
        norm = 0.0
        if proto is not None:
            rho = self.pcfg.residual_share
            flat, norm = residual_edit(
                flat,
                proto.flat,
                self.hspec,
                rank=self.pcfg.residual_rank,
                bound=rho * self.bound,
                bias_bound=rho * self.bias_bound,
            )
        ref = None if proto is None else proto.key
        data = encode_payload(flat, dtype=self.cfg.payload_dtype, prototype=ref)
        cloud_ms = gen_ms + (time.perf_counter() - tc) * 1e3
        t0 = time.perf_counter()  # device: decode, then compose + validate + factored weights
        decoded = decode_values(data, spec=self.spec, max_rank=2 * self.rank)
        t1 = time.perf_counter()
        prepared = self.ranker.prepare_decoded(decoded, None if proto is None else proto.edit)
        t2 = time.perf_counter()
        edit, bounds = prepared.edit, self.ranker.bounds  # the composed edit, for the counts
        return DeviceEdit(
            prepared=prepared,
            decode_us=(t1 - t0) * 1e6,
            apply_us=(t2 - t1) * 1e6,
            device_flops=apply_flops(edit, self.spec, bounds),
            event_flops=event_flops(edit, self.spec, bounds),
            device_peak_bytes=_weights_bytes(prepared, self.ranker.model.head),
            uplink_bytes=uplink_bytes(
                length,
                self.adaptor_uplink_items if adaptor else self.cfg.uplink_items,
                self.summary_dim,
                proto is not None,
            )
            + (
                refine_uplink_bytes(length, self.cfg, self.summary_dim // 2)
                if states_uplinked
                else 0
            ),
            payload_bytes=len(data),
            cloud_ms=cloud_ms,
            prototype=ref,
            residual_norm=float(norm),
        )

    # ---- on-device fine-tuning ---------------------------------------------------------------
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
                device_flops=flops + apply_flops(res.edit, self.spec, UNBOUNDED),
                event_flops=event_flops(res.edit, self.spec, UNBOUNDED),
                device_peak_bytes=peak,
                stream_len=len(seq),
            )
        return out

    # ---- costs --------------------------------------------------------------------------------
    def costs(self, lengths: np.ndarray, edits: Mapping[int, DeviceEdit]) -> CostAccumulator:
        """One policy's costs on one device (its request lengths [R] and their edits); a
        prototype is downloaded on its first use. Each request's FLOPs include its edit's
        ``event_flops`` for every event it serves: the events at positions from its
        length up to the next request's (or the device's last event; every event from
        the first request on is evaluated, as both start at ``min_history``)."""
        acc = CostAccumulator()
        held: set[tuple[int, int]] = set()
        ls = lengths.tolist()
        for n, length in enumerate(ls):
            e = edits[length]
            if n + 1 < len(ls):
                served = ls[n + 1] - length
            else:
                served = 1 if e.stream_len is None else max(e.stream_len - length, 0)
            extra_us, extra_bytes = 0.0, 0
            if e.prototype is not None and e.prototype not in held:
                held.add(e.prototype)
                p = self._protos[e.prototype]
                extra_us, extra_bytes = p.decode_us, p.payload_bytes
                acc.prototype_downloads += 1
                acc.prototype_bytes += extra_bytes
            acc.add(
                decode_us=e.decode_us + extra_us,
                apply_us=e.apply_us,
                device_flops=e.device_flops + e.event_flops * served,
                device_peak_bytes=e.device_peak_bytes,
                uplink_bytes=e.uplink_bytes,
                downlink_bytes=e.payload_bytes + extra_bytes,
                payload_bytes=e.payload_bytes,
                cloud_ms=e.cloud_ms,
                initial=n == 0,
            )
        return acc


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


def _weights_bytes(prepared: PreparedEdit, head: torch.nn.Module) -> int:
    """Bytes of the tensors an edit adds on the device: per layer the new bias, the
    factors it keeps, and a materialised weight (one that is not the base W)."""
    base = {id(p) for p in head.parameters()}
    total = 0
    for layer in prepared.weights.layers:
        for t in (layer.w, layer.b, layer.a, layer.v):
            if t is not None and id(t) not in base:
                total += t.numel() * t.element_size()
    return total
