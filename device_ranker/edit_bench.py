"""The device's edit path, measured for ``recsys bench ranker`` (:func:`edit_figures`).

Decode + validate + apply of an fp16 RSE1 payload as the device service runs it, the
composed (prototype + residual) variant, revert, and the head with an edit factored
(``x W^T + (x V) A^T``) vs dense (materialised ``W + A V^T``), single-edit and per-user.

Example::

    figures = edit_figures(ranker, histories, BenchConfig())
    figures["edit_apply_r8_us"], figures["head_factored_b1_us"]
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from device_ranker.edits import random_edit
from device_ranker.head import EditedWeights, head_forward, queries_per_user
from device_ranker.ranker import Ranker
from recsys.edit_payload import decode_values, encode_payload

if TYPE_CHECKING:
    from device_ranker.bench import BenchConfig


def _time_us(fn, repeats: int, warmup: int = 100) -> tuple[float, float]:
    """p50 and p99 of ``fn()`` in microseconds."""
    return _time_many({"": fn}, repeats, warmup)[""]


def _time_many(fns: dict[str, Any], repeats: int, warmup: int = 100, chunk: int = 50):
    """label -> (p50, p99) in microseconds of ``repeats`` calls of each function, taken
    in interleaved chunks of ``chunk`` calls so that every label sees the same machine
    load (a shared machine's load moves within seconds)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[int]] = {k: [] for k in fns}
    for _ in range(max(repeats // chunk, 1)):
        for k, fn in fns.items():
            for _ in range(chunk):
                t0 = time.perf_counter_ns()
                fn()
                times[k].append(time.perf_counter_ns() - t0)
    return {
        k: (float(np.percentile(t, 50) / 1e3), float(np.percentile(t, 99) / 1e3))
        for k, t in times.items()
    }


def edit_figures(ranker: Ranker, hists: list, cfg: BenchConfig) -> dict[str, Any]:
    """What applying an edit costs on the device.

    * decode + validate + apply of one fp16 RSE1 payload (random edit of every layer with
      bias deltas, rank 8 and 16, capped by a tiny head): ``ranker.apply_edit(
      ranker.prepare_decoded(decode_values(data, spec, max_rank)))``, the device
      service's path; and the same for a rank-4 residual of a held rank-8 prototype,
      composed on the device (interleaved, :func:`_time_many`);
    * revert;
    * the head with the largest-rank edit, factored (``x W^T + (x V) A^T``) vs dense
      (materialised ``W + A V^T``) at B=1 and B=``batch_size`` rows of one edit, the
      materialisation itself, and the per-user head (:func:`queries_per_user`) over
      ``batch_size`` rows each with its own edit, factored vs stacked dense weights.
    """
    out: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(cfg.seed)
    # the read-only spec the device service decodes against (Ranker.payload_spec)
    head, spec, reps = ranker.model.head, ranker.payload_spec, cfg.edit_repeats
    max_rank = ranker.bounds.max_rank
    top = min(max_rank, *(min(o, i) for o, i in spec.values()))  # a tiny head caps r
    ranks = sorted({min(r, top) for r in (8, 16)})
    small = min(4, top // 2)
    proto = min(8, top - small)
    edits = {
        r: random_edit(head, rank=r, scale=0.002, generator=gen) for r in {*ranks, small, proto}
    }

    def apply_fn(data: bytes, prototype=None):
        def apply() -> None:
            decoded = decode_values(data, spec=spec, max_rank=max_rank)
            ranker.apply_edit(ranker.prepare_decoded(decoded, prototype))

        return apply

    payloads = {r: encode_payload(edits[r].to_flat(), dtype="fp16") for r in ranks}
    r0 = ranks[0]
    decoded = decode_values(payloads[r0], spec=spec, max_rank=max_rank)
    residual = encode_payload(edits[small].to_flat(), dtype="fp16", prototype=(1, 1))
    timed = _time_many(
        {
            **{f"r{r}": apply_fn(payloads[r]) for r in ranks},
            "decode": lambda: decode_values(payloads[r0], spec=spec, max_rank=max_rank),
            "prepare": lambda: ranker.apply_edit(ranker.prepare_decoded(decoded)),
            "proto": apply_fn(residual, edits[proto]),
        },
        reps,
    )
    for r in ranks:
        out[f"edit_apply_r{r}_us"], out[f"edit_apply_r{r}_p99_us"] = timed[f"r{r}"]
    out["edit_apply_ranks"], out["edit_proto_ranks"], out["edit_rank"] = ranks, [proto, small], r0
    out["edit_apply_us"], out["edit_apply_p99_us"] = timed[f"r{r0}"]
    out["edit_decode_us"], out["edit_prepare_us"] = timed["decode"][0], timed["prepare"][0]
    out["edit_apply_proto_us"], out["edit_apply_proto_p99_us"] = timed["proto"]
    edit = edits[r0]
    before = ranker.scores(hists[:8], edit="base")
    prepared = ranker.apply_edit(edit)
    edited = ranker.scores(hists[:8])
    states, model = ranker.user_states(hists[:8]), ranker.model  # [8, D]
    with torch.inference_mode():
        dense = model.item_scores(prepared.weights.forward(states, head.residual, mode="dense"))
        fact = model.item_scores(prepared.weights.forward(states, head.residual, mode="factored"))
    out["edit_factored_vs_dense_max_abs_diff"] = float((fact - dense).abs().max())
    t_rev = []
    for _ in range(reps):
        ranker.apply_edit(edit)
        t0 = time.perf_counter_ns()
        ranker.revert_edit()
        t_rev.append(time.perf_counter_ns() - t0)
    out["edit_revert_us"] = float(np.percentile(t_rev, 50) / 1e3)
    out["edit_bytes_fp32"] = edit.nbytes()
    out["edit_bytes_fp16"] = edit.to(torch.float16).nbytes()
    out["edit_score_change"] = float((edited - before).abs().max())
    out["edit_revert_exact"] = bool(torch.equal(ranker.scores(hists[:8]), before))
    out.update(_forward_figures(ranker, edits[ranks[-1]], cfg))
    out["head_edit_rank"] = ranks[-1]
    return out


def _forward_figures(ranker: Ranker, edit, cfg: BenchConfig) -> dict[str, Any]:
    """Factored vs dense head with one edit (see :func:`edit_figures`)."""
    out: dict[str, Any] = {}
    head, reps = ranker.model.head, max(cfg.edit_repeats // 4, 50)
    weights = ranker.prepare(edit).weights
    dense = weights.dense()
    dim, big = head.dims[0], cfg.batch_size
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.inference_mode():
        for rows in (1, big):
            x = torch.randn(rows, dim, generator=gen)
            t = _time_many(
                {
                    "factored": lambda x=x: weights.forward(x, head.residual, mode="factored"),
                    "dense": lambda x=x: head_forward(x, dense, head.residual),
                },
                reps,
            )
            out[f"head_factored_b{rows}_us"] = t["factored"][0]
            out[f"head_dense_b{rows}_us"] = t["dense"][0]
        out["head_materialise_us"] = _time_us(lambda: EditedWeights(weights.layers).dense(), reps)[
            0
        ]
        x = torch.randn(big, dim, generator=gen)
        per_user = [ranker.prepare(edit).weights for _ in range(big)]
        per_user_dense = [w.dense() for w in per_user]
        t = _time_many(
            {
                "factored": lambda: queries_per_user(head, x, per_user),
                "dense": lambda: queries_per_user(head, x, per_user_dense),
            },
            20,
            3,
            chunk=5,
        )
        for label in ("factored", "dense"):
            out[f"per_user_{label}_ms"] = t[label][0] / 1e3
    out["head_batch_rows"] = big
    return out
