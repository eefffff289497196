"""``recsys bench ranker``: quality and cost figures of the device ranker.

Quality: leave-one-out by time, full-catalogue ranking, items the user has already
seen excluded (ml-100k users rate a movie once, so the target is never excluded);
HR/NDCG/MRR@10 and HR/NDCG@20 of our ranker and of our popularity baseline, next to
RecBole 1.2.1 figures quoted for the same protocol.

Cost: single-user full-catalogue ``Ranker.recommend`` latency p50/p99 (in process,
eager TorchRec path and exported program), batched throughput (users/s), the device's
edit path (decode + validate + apply of an fp16 payload, p50/p99; :func:`edit_figures`),
revert time, the head with an edit factored vs dense, and head fine-tuning cost per
user (wall ms, FLOPs, peak bytes).

Example::

    figures = run_bench(BenchConfig(), ds, checkpoint=path)   # dict; print_rows(figures)
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from device_ranker.edit_bench import edit_figures
from device_ranker.evaluate import evaluate, evaluate_popularity, loo_eval_set
from device_ranker.export import ExportedRanker
from device_ranker.finetune import finetune_head
from device_ranker.ranker import Ranker
from recsys.data import Dataset, leave_one_out

logger = logging.getLogger(__name__)

PROTOCOL = (
    "leave-one-out by time (last event test, second-to-last valid), full-catalogue "
    "ranking, already-seen items excluded, pessimistic ties"
)

#: RecBole 1.2.1 on ml-100k, same protocol (quoted, not re-run here).
PEER_FIGURES: dict[str, dict[str, Any]] = {
    "Pop (RecBole 1.2.1)": {
        "hr@10": 0.0710,
        "ndcg@10": 0.0354,
        "mrr@10": 0.0246,
        "hr@20": 0.1177,
        "ndcg@20": 0.0473,
        "note": "excludes seen",
    },
    "BPR (RecBole 1.2.1)": {
        "hr@10": 0.1241,
        "ndcg@10": 0.0673,
        "mrr@10": 0.0502,
        "hr@20": 0.1951,
        "ndcg@20": 0.0850,
        "note": "excludes seen",
    },
    "GRU4Rec (RecBole 1.2.1)": {
        "hr@10": 0.1039,
        "ndcg@10": 0.0481,
        "mrr@10": 0.0312,
        "hr@20": 0.1994,
        "ndcg@20": 0.0722,
        "note": "not converged",
    },
    "SASRec (RecBole 1.2.1)": {
        "hr@10": 0.1188,
        "ndcg@10": 0.0581,
        "mrr@10": 0.0400,
        "hr@20": 0.1909,
        "ndcg@20": 0.0764,
        "note": "not converged",
    },
}
METRIC_KEYS = ("hr@10", "ndcg@10", "mrr@10", "hr@20", "ndcg@20")


@dataclass(frozen=True)
class BenchConfig:
    """What the benchmark measures (sizes kept small enough for 2 shared cores)."""

    latency_users: int = 300  # single-user requests timed (p50/p99 over them)
    batch_size: int = 256  # users per batched request
    edit_rank: int = 8  # r of the random benchmark edit (every head layer + bias)
    edit_repeats: int = 2000  # timed edit applications
    finetune_users: int = 20  # users fine-tuned for the per-user cost
    finetune_steps: int = 5
    seed: int = 0


def _percentiles_ms(samples_s: list[float]) -> tuple[float, float]:
    a = np.asarray(samples_s) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def run_bench(cfg: BenchConfig, ds: Dataset, ranker: Ranker) -> dict[str, Any]:
    """Measure everything; returns a flat dict of figures plus per-model metric rows."""
    rng = np.random.default_rng(cfg.seed)
    split = leave_one_out(ds)
    test = loo_eval_set(ds, split, "test")
    out: dict[str, Any] = {"protocol": PROTOCOL, "bench_config": asdict(cfg)}

    logger.info("evaluating on %d test users", len(test.targets))
    ours = evaluate(lambda hs: ranker.scores(hs, edit="base"), test)
    pop = evaluate_popularity(ds, split.train, test)
    out.update({k: ours[k] for k in (*METRIC_KEYS, "mrr@20")})
    out["test_users"] = ours["users"]
    out["models"] = {
        "DeviceRanker (ours)": {k: ours[k] for k in METRIC_KEYS} | {"note": "excludes seen"},
        "Pop (ours)": {k: pop[k] for k in METRIC_KEYS} | {"note": "excludes seen"},
        **PEER_FIGURES,
    }

    # ---- single-user latency (eager TorchRec path) ----------------------------------
    users = rng.choice(
        len(test.targets), size=min(cfg.latency_users, len(test.targets)), replace=False
    )
    hists = [test.histories[i] for i in users]
    for h in hists[:20]:  # warm-up
        ranker.recommend(h, k=10)
    times = []
    for h in hists:
        t0 = time.perf_counter()
        ranker.recommend(h, k=10)
        times.append(time.perf_counter() - t0)
    out["latency_p50_ms"], out["latency_p99_ms"] = _percentiles_ms(times)

    # ---- exported program: parity and latency ---------------------------------------
    with tempfile.TemporaryDirectory() as tmp:
        served = ExportedRanker.load(ranker.export(Path(tmp) / "export"))
        diff = (served.scores(hists[:64]) - ranker.scores(hists[:64], edit="base")).abs().max()
        out["export_max_abs_diff"] = float(diff)
        for h in hists[:20]:
            served.recommend_batch([h], k=10)
        times = []
        for h in hists:
            t0 = time.perf_counter()
            served.recommend_batch([h], k=10)
            times.append(time.perf_counter() - t0)
        out["export_latency_p50_ms"], out["export_latency_p99_ms"] = _percentiles_ms(times)

    # ---- batched throughput ---------------------------------------------------------
    all_h = test.histories
    ranker.recommend_batch(all_h[: cfg.batch_size], k=10)
    times = []
    t_all = time.perf_counter()
    for start in range(0, len(all_h), cfg.batch_size):
        t0 = time.perf_counter()
        ranker.recommend_batch(all_h[start : start + cfg.batch_size], k=10)
        times.append(time.perf_counter() - t0)
    out["users_per_s"] = len(all_h) / (time.perf_counter() - t_all)
    out["batch_size"] = cfg.batch_size
    out["batch_latency_p50_ms"], out["batch_latency_p99_ms"] = _percentiles_ms(times)

    # ---- edit application -----------------------------------------------------------
    out.update(edit_figures(ranker, hists, cfg))

    # ---- on-device fine-tuning baseline ---------------------------------------------
    ft_users = [h for h in hists if len(h) >= 2][: cfg.finetune_users]
    walls, flops, peaks = [], [], []
    for i, h in enumerate(ft_users):
        res = finetune_head(ranker.model, h, steps=cfg.finetune_steps, measure=i < 3)
        walls.append(res.wall_ms)
        if res.flops is not None:
            flops.append(res.flops)
            peaks.append(res.peak_bytes)
    out["finetune_ms_per_user"] = float(np.mean(walls))
    out["finetune_steps"] = cfg.finetune_steps
    out["finetune_flops_per_user"] = float(np.mean(flops))
    out["finetune_peak_bytes"] = float(np.mean(peaks))
    out["torch_threads"] = torch.get_num_threads()
    return out


def metric_rows(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the quality table (one per model)."""
    return [
        {"model": name, **{k: row[k] for k in METRIC_KEYS}, "note": row.get("note", "")}
        for name, row in figures["models"].items()
    ]


def cost_rows(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the cost table."""
    f = figures
    return [
        {
            "figure": "single-user full-catalogue top-10, eager (ms)",
            "p50": f["latency_p50_ms"],
            "p99": f["latency_p99_ms"],
        },
        {
            "figure": "single-user full-catalogue top-10, exported (ms)",
            "p50": f["export_latency_p50_ms"],
            "p99": f["export_latency_p99_ms"],
        },
        {
            "figure": f"batched top-10, {f['batch_size']} users per call (ms)",
            "p50": f["batch_latency_p50_ms"],
            "p99": f["batch_latency_p99_ms"],
        },
        {"figure": "batched throughput (users/s)", "p50": f["users_per_s"], "p99": ""},
        *(
            {
                "figure": f"edit decode + validate + apply, fp16 payload, rank {r} (us)",
                "p50": f[f"edit_apply_r{r}_us"],
                "p99": f[f"edit_apply_r{r}_p99_us"],
            }
            for r in f["edit_apply_ranks"]
        ),
        {
            "figure": f"  of which decode / validate + apply, rank {f['edit_rank']} (us)",
            "p50": f"{f['edit_decode_us']:.1f} / {f['edit_prepare_us']:.1f}",
            "p99": "",
        },
        {
            "figure": "edit, rank-{1} residual of a held rank-{0} prototype: decode + compose + "
            "validate + apply (us)".format(*f["edit_proto_ranks"]),
            "p50": f["edit_apply_proto_us"],
            "p99": f["edit_apply_proto_p99_us"],
        },
        {"figure": "edit revert (us)", "p50": f["edit_revert_us"], "p99": ""},
        *(
            {
                "figure": f"head, rank-{f['head_edit_rank']} edit, {b} row(s): factored / dense (us)",
                "p50": f"{f[f'head_factored_b{b}_us']:.1f} / {f[f'head_dense_b{b}_us']:.1f}",
                "p99": "",
            }
            for b in (1, f["head_batch_rows"])
        ),
        {
            "figure": f"materialise W + A V^T, rank {f['head_edit_rank']}, every layer (us)",
            "p50": f["head_materialise_us"],
            "p99": "",
        },
        {
            "figure": f"per-user head, {f['head_batch_rows']} rows, own rank-{f['head_edit_rank']} "
            "edit each: factored / dense (ms)",
            "p50": f"{f['per_user_factored_ms']:.2f} / {f['per_user_dense_ms']:.2f}",
            "p99": "",
        },
        {
            "figure": f"head fine-tuning, {f['finetune_steps']} steps (ms/user)",
            "p50": f["finetune_ms_per_user"],
            "p99": "",
        },
        {
            "figure": "head fine-tuning (MFLOP/user)",
            "p50": f["finetune_flops_per_user"] / 1e6,
            "p99": "",
        },
        {
            "figure": "head fine-tuning peak memory (KiB)",
            "p50": f["finetune_peak_bytes"] / 1024,
            "p99": "",
        },
    ]
