"""``recsys bench scale``: what the device side costs as the catalogue, the user table and
the event stream grow, on synthetic data the benchmark generates itself (seeded).

Synthetic data (:func:`synthetic_ranker`, :func:`synthetic_histories`):

* a catalogue of N items with a Zipf popularity (item of popularity rank r drawn with
  probability ~ r^-``zipf``, ranks in random order);
* the real :class:`~device_ranker.model.SeqRanker` (TorchRec embedding collection, SASRec
  encoder, editable head) at the trained ml-100k dimensions (D=64, T=50, 2 blocks, H=128)
  with N items and random weights (no training: costs do not depend on the values). Item
  vectors are clustered like real ones (``topics`` Gaussian centres, each item a centre
  plus noise, norms as in the trained table) and a small item bias follows popularity
  (``log p``, its spread small next to the query-item products, as in the trained
  ranker), so the top-10 is decided by the vectors, not by the bias alone (a bias-driven
  top-10 would make the pre-selection's recall trivially 1);
* user histories of log-normal length (median ``history_median`` events, at most
  ``history_cap``), items drawn from the popularity.

Per catalogue size (:func:`catalogue_figures`): Recommend latency p50/p99 for one user
(wall, and the thread's CPU time: on a shared machine the wall time includes waiting for
a core, reported as ``cpu_share``), the device server's bytes per item (model +
index + the item-id maps of its user store)
(``Ranker.recommend``: the faiss pre-selection of :mod:`device_ranker.ann` when the size
reaches ``AnnConfig.min_items``, exact full scoring below), batched throughput
(``recommend_batch``), recall@10 of that path against exact full scoring, memory per item
(model parameters + index bytes over N), the index build time, and the edit path (decode +
validate + apply of an fp16 rank-8 payload; it does not depend on N).

Per user-table size (:func:`user_table_figures`): the real device server's
:class:`~device_ranker.service.users.UserStore` holding U synthetic users with their
histories; bytes per user measured with ``tracemalloc`` (Python objects allocated while the
users were created) next to the store's own estimate (``UserStore.bytes_held``).

The event stream (:func:`event_loop_figures`): the **device-side per-event loop**, not the
replay engine (that one needs trained cloud artefacts): per event the user is found in the
user store and the event appended, and every ``batch`` events the users of the batch are
ranked (``recommend_batch``, top-10 over the catalogue, as the replay ranks each event's
user before it); events/s.

Example::

    figures = run_scale_bench(ScaleConfig(sizes=(10_000,), users=(1_000,), events=5_000))
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from device_ranker.ann import recall_at_k
from device_ranker.config import AnnConfig, ModelConfig
from device_ranker.edits import random_edit
from device_ranker.model import SeqRanker
from device_ranker.ranker import Ranker
from recsys.edit_payload import decode_values, encode_payload

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScaleConfig:
    """What ``recsys bench scale`` measures (defaults: a few minutes on one core)."""

    sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)  # catalogue sizes N
    users: tuple[int, ...] = (10_000, 100_000)  # user-table sizes U measured
    extrapolate_users: tuple[int, ...] = (1_000_000,)  # user-table sizes extrapolated
    events: int = 100_000  # events of the per-event loop
    loop_items: int = 10_000  # catalogue of the user table and the per-event loop
    loop_users: int = 10_000  # users the event stream draws from
    batch: int = 64  # users per batched ranking call (throughput, the event loop)
    latency_users: int = 200  # single-user Recommend calls timed per size
    throughput_batches: int = 10  # batched calls timed per size
    recall_users: int = 500  # users whose top-10 is compared with exact scoring
    edit_repeats: int = 500  # timed edit applications per size
    k: int = 10
    zipf: float = 1.0  # popularity exponent
    topics: int = 256  # item-vector clusters
    bias_scale: float = 0.01  # item bias = bias_scale * log(p / max p)
    history_median: int = 30  # events per user (log-normal median)
    history_cap: int = 200  # at most (the device's default history_len)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(num_items=1))
    ann: AnnConfig = field(default_factory=AnnConfig)
    seed: int = 0


# ---- synthetic data -------------------------------------------------------------------------
def popularity(n: int, zipf: float, rng: np.random.Generator) -> np.ndarray:
    """Item probabilities [n]: the item at popularity rank r gets ~ r^-zipf; the ranks are
    a random permutation of the items."""
    p = np.arange(1, n + 1, dtype=np.float64) ** -zipf
    p /= p.sum()
    return p[rng.permutation(n)]


def synthetic_ranker(n: int, cfg: ScaleConfig, probs: np.ndarray) -> Ranker:
    """The real ranker (random weights) at ``cfg.model``'s dimensions with n items: item
    vectors ``centre[topic] + noise`` (``cfg.topics`` centres, topics drawn by popularity
    too; norm ~0.54, as the trained ml-100k table's), item bias
    ``cfg.bias_scale * log(p / max p)`` (popular items score higher, but the bias stays
    small next to the query-item products, as in the trained ranker: there the bias's
    spread is 0.04 against 1.4 for a user's products), ANN per ``cfg.ann``."""
    rng = np.random.default_rng(cfg.seed + n)
    torch.manual_seed(cfg.seed)
    model = SeqRanker(dataclasses.replace(cfg.model, num_items=n)).eval()
    d = model.cfg.dim
    centres = rng.normal(0.0, 0.06, size=(cfg.topics, d)).astype(np.float32)
    topic = rng.choice(cfg.topics, size=n, p=popularity(cfg.topics, cfg.zipf, rng))
    vectors = centres[topic] + rng.normal(0.0, 0.03, size=(n, d)).astype(np.float32)
    bias = cfg.bias_scale * np.log(probs / probs.max())
    with torch.no_grad():
        model.item_table.copy_(torch.from_numpy(vectors))
        model.item_bias.copy_(torch.from_numpy(bias.astype(np.float32)))
    return Ranker(model, ann=cfg.ann)


def synthetic_histories(
    users: int, probs: np.ndarray, cfg: ScaleConfig, rng: np.random.Generator
) -> list[np.ndarray]:
    """``users`` histories (int64 item indices): log-normal lengths (median
    ``cfg.history_median``, 1..``cfg.history_cap``), items drawn by popularity."""
    lengths = np.clip(
        np.rint(rng.lognormal(math.log(cfg.history_median), 0.8, size=users)), 1, cfg.history_cap
    ).astype(np.int64)
    items = rng.choice(len(probs), size=int(lengths.sum()), p=probs).astype(np.int64)
    return np.split(items, np.cumsum(lengths)[:-1])


# ---- timing helpers -------------------------------------------------------------------------
def _pct(samples: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(samples, dtype=np.float64)
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def _timed(fn: Callable[[Any], Any], calls: Sequence[Any], warmup: int = 3) -> list[float]:
    """Wall milliseconds of ``fn(c)`` for every c (after ``warmup`` untimed calls)."""
    return _timed_cpu(fn, calls, warmup)[0]


def _timed_cpu(
    fn: Callable[[Any], Any], calls: Sequence[Any], warmup: int = 3
) -> tuple[list[float], list[float]]:
    """(wall ms, this thread's CPU ms) of ``fn(c)`` for every c: on a shared machine the
    wall time includes the time the process waited for a core, the CPU time does not
    (with one torch / faiss thread all the work runs on this thread)."""
    for c in calls[:warmup]:
        fn(c)
    wall, cpu = [], []
    for c in calls:
        c0, t0 = time.thread_time(), time.perf_counter()
        fn(c)
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.thread_time() - c0) * 1e3)
    return wall, cpu


def _module_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def edit_apply_us(ranker: Ranker, repeats: int, seed: int = 0) -> tuple[float, float]:
    """p50 / p99 microseconds of decode + validate + apply of an fp16 rank-8 payload, the
    device service's path (``decode_values`` -> ``prepare_decoded`` -> ``apply_edit``)."""
    gen = torch.Generator().manual_seed(seed)
    edit = random_edit(ranker.model.head, rank=8, scale=0.002, generator=gen)
    data = encode_payload(edit.to_flat(), dtype="fp16")
    spec, max_rank = ranker.edit_spec(), ranker.bounds.max_rank

    def apply(_: Any) -> None:
        ranker.apply_edit(ranker.prepare_decoded(decode_values(data, spec=spec, max_rank=max_rank)))

    times = _timed(apply, range(repeats), warmup=50)
    ranker.revert_edit()
    p50, p99 = _pct(times)
    return p50 * 1e3, p99 * 1e3


# ---- the three measurements -----------------------------------------------------------------
def catalogue_figures(n: int, cfg: ScaleConfig) -> dict[str, Any]:
    """Recommend latency / throughput / recall@10 / memory per item / edit cost at n items."""
    rng = np.random.default_rng(cfg.seed)
    probs = popularity(n, cfg.zipf, np.random.default_rng(cfg.seed + n))
    t0 = time.perf_counter()
    ranker = synthetic_ranker(n, cfg, probs)
    model_s = time.perf_counter() - t0
    users = max(cfg.latency_users, cfg.recall_users, cfg.batch * cfg.throughput_batches)
    hists = synthetic_histories(users, probs, cfg, rng)
    t0 = time.perf_counter()
    index = ranker.ann_index()  # None below AnnConfig.min_items (exact scoring)
    build_s = time.perf_counter() - t0
    path = "exact" if index is None else f"ann-{cfg.ann.kind}"
    lat, lat_cpu = _timed_cpu(lambda h: ranker.recommend(h, cfg.k), hists[: cfg.latency_users])
    batches = [hists[i * cfg.batch : (i + 1) * cfg.batch] for i in range(cfg.throughput_batches)]
    per_batch = _timed(lambda b: ranker.recommend_batch(b, cfg.k), batches, warmup=1)
    recall = 1.0
    if index is not None:
        exact = Ranker(ranker.model, ann=AnnConfig(mode="off"))
        sample = hists[: cfg.recall_users]
        got = np.concatenate(
            [
                ranker.recommend_batch(sample[s : s + cfg.batch], cfg.k)[0].numpy()
                for s in range(0, len(sample), cfg.batch)
            ]
        )
        want = np.concatenate(
            [
                exact.recommend_batch(sample[s : s + cfg.batch], cfg.k)[0].numpy()
                for s in range(0, len(sample), cfg.batch)
            ]
        )
        recall = recall_at_k(got, want)
    model_bytes = _module_bytes(ranker.model)
    index_bytes = 0 if index is None else int(index.nbytes)
    map_bytes = catalogue_map_bytes(n)
    edit_p50, edit_p99 = edit_apply_us(ranker, cfg.edit_repeats, cfg.seed)
    p50, p99 = _pct(lat)
    cpu50, cpu99 = _pct(lat_cpu)
    return {
        "items": n,
        "path": path,
        "recommend_p50_ms": p50,
        "recommend_p99_ms": p99,
        "recommend_cpu_p50_ms": cpu50,
        "recommend_cpu_p99_ms": cpu99,
        "cpu_share": float(np.sum(lat_cpu) / np.sum(lat)),  # CPU / wall over the calls
        "batch_users_per_s": cfg.batch / (float(np.median(per_batch)) / 1e3),
        "recall_at_10": recall,
        "model_bytes": model_bytes,
        "index_bytes": index_bytes,
        "bytes_per_item": (model_bytes + index_bytes) / n,
        "map_bytes": map_bytes,
        "server_bytes_per_item": (model_bytes + index_bytes + map_bytes) / n,
        "index_build_s": build_s,
        "model_build_s": model_s,
        "edit_apply_p50_us": edit_p50,
        "edit_apply_p99_us": edit_p99,
    }


def catalogue_map_bytes(n: int) -> int:
    """Bytes (tracemalloc) of what a device server keeps per item besides the model and
    the index: the item id strings (``"i123"``-style, as short as real ids get) and the
    ``UserStore``'s id -> index dict."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    ids = [f"i{i}" for i in range(n)]
    index = {item: i for i, item in enumerate(ids)}
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del ids, index
    return int(held)


def _user_store(ranker: Ranker, max_users: int):
    from device_ranker.service.config import DeviceConfig
    from device_ranker.service.users import UserStore

    item_ids = [f"i{i}" for i in range(ranker.num_items)]
    config = DeviceConfig(checkpoint="synthetic", max_users=max_users, seed_histories="none")
    vectors = ranker.model.item_table.detach().numpy()
    return UserStore(item_ids, config, vectors)


def fill_users(store, hists: Sequence[np.ndarray], t0: int = 1_700_000_000) -> None:
    """Give the store one user per history, as seeding from a dataset does (the
    catalogue's own int objects in the history, one timestamp per event)."""
    shared = list(store.item_index.values())
    for u, h in enumerate(hists):
        st = store.new_user(f"u{u}", evict=False)
        for j, i in enumerate(h.tolist()):
            item = shared[i]
            st.history.append(item)
            st.times.append(t0 + j)
            st.seen.add(item)
            st.position += 1
        store.meter.account(st)


def user_table_figures(users: int, ranker: Ranker, probs: np.ndarray, cfg: ScaleConfig):
    """Bytes per user of the device server's user table holding ``users`` synthetic users
    (tracemalloc of their creation; the store's own estimate next to it)."""
    rng = np.random.default_rng(cfg.seed + users)
    hists = synthetic_histories(users, probs, cfg, rng)
    store = _user_store(ranker, max_users=users)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    fill_users(store, hists)
    fill_s = time.perf_counter() - t0
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    out = {
        "users": users,
        "measured": True,
        "events_held": int(sum(len(h) for h in hists)),
        "bytes_per_user": held / users,
        "estimate_bytes_per_user": store.bytes_held / users,
        "total_mib": held / 2**20,
        "fill_s": fill_s,
    }
    del store
    gc.collect()
    return out


def event_loop_figures(ranker: Ranker, probs: np.ndarray, cfg: ScaleConfig) -> dict[str, Any]:
    """Events/s of the device-side per-event loop (see the module docstring) over
    ``cfg.events`` synthetic events of ``cfg.loop_users`` users (users drawn uniformly,
    items by popularity)."""
    rng = np.random.default_rng(cfg.seed + 1)
    store = _user_store(ranker, max_users=cfg.loop_users)
    fill_users(store, synthetic_histories(cfg.loop_users, probs, cfg, rng))
    who = rng.integers(0, cfg.loop_users, size=cfg.events)
    what = rng.choice(len(probs), size=cfg.events, p=probs)
    t_event = 1_800_000_000
    t0 = time.perf_counter()
    for s in range(0, cfg.events, cfg.batch):
        sts = [store.user(f"u{u}") for u in who[s : s + cfg.batch].tolist()]
        ranker.recommend_batch([np.fromiter(st.history, np.int64) for st in sts], cfg.k)
        for st, item in zip(sts, what[s : s + cfg.batch].tolist(), strict=True):
            st.append(item, t_event)
            t_event += 1
    seconds = time.perf_counter() - t0
    return {
        "events": cfg.events,
        "items": ranker.num_items,
        "users": cfg.loop_users,
        "batch": cfg.batch,
        "seconds": seconds,
        "events_per_s": cfg.events / seconds,
        "loop": "device-side per-event loop (user store + batched top-10), not the replay engine",
    }


def _fit_linear(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares y = a + b x."""
    b, a = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(a), float(b)


def run_scale_bench(
    cfg: ScaleConfig, progress: Callable[[str, dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Every measurement of the module docstring; a dict of rows and config."""
    out: dict[str, Any] = {"config": asdict(cfg), "torch_threads": torch.get_num_threads()}
    rows = []
    for n in cfg.sizes:
        logger.info("catalogue of %d items", n)
        row = catalogue_figures(n, cfg)
        rows.append(row)
        gc.collect()
        if progress:
            progress("catalogue", row)
    out["catalogue"] = rows
    probs = popularity(cfg.loop_items, cfg.zipf, np.random.default_rng(cfg.seed + cfg.loop_items))
    ranker = synthetic_ranker(cfg.loop_items, cfg, probs)
    users = []
    for u in cfg.users:
        row = user_table_figures(u, ranker, probs, cfg)
        users.append(row)
        if progress:
            progress("users", row)
    if users:
        a, b = _fit_linear([r["users"] for r in users], [r["total_mib"] for r in users])
        per = users[-1]["bytes_per_user"]
        for u in cfg.extrapolate_users:
            if u in cfg.users:
                continue
            users.append(
                {
                    "users": u,
                    "measured": False,
                    "events_held": None,
                    "bytes_per_user": per,
                    "estimate_bytes_per_user": None,
                    "total_mib": a + b * u,
                    "fill_s": None,
                    "note": f"extrapolated: {a:.1f} MiB + {b * 2**20:.0f} B x users "
                    f"(least squares over {[r['users'] for r in users if r['measured']]})",
                }
            )
    out["user_table"] = users
    out["event_loop"] = event_loop_figures(ranker, probs, cfg) if cfg.events else None
    return out


def plot_scale(figures: dict[str, Any], path: str) -> None:
    """PNG of cost vs size: Recommend p50/p99 (wall and CPU time) and memory per item
    against catalogue size, user-table MiB against users (extrapolated points hollow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cat, users = figures["catalogue"], figures["user_table"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    n = [r["items"] for r in cat]
    ax = axes[0]
    ax.plot(n, [r["recommend_p50_ms"] for r in cat], "o-", label="p50")
    ax.plot(n, [r["recommend_p99_ms"] for r in cat], "s--", label="p99")
    if all("recommend_cpu_p50_ms" in r for r in cat):
        ax.plot(n, [r["recommend_cpu_p50_ms"] for r in cat], "o:", label="CPU time p50")
        ax.plot(n, [r["recommend_cpu_p99_ms"] for r in cat], "s:", label="CPU time p99")
    ax.axhline(20, color="grey", lw=0.8, ls=":", label="p99 target 20 ms")
    for r in cat:
        ax.annotate(r["path"], (r["items"], r["recommend_p50_ms"]), fontsize=7)
    ax.set(xscale="log", yscale="log", xlabel="catalogue items", ylabel="Recommend ms (1 user)")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(n, [r["bytes_per_item"] for r in cat], "o-", label="model + index")
    if all("server_bytes_per_item" in r for r in cat):
        ax.plot(n, [r["server_bytes_per_item"] for r in cat], "s--", label="+ item-id maps")
    ax.set(xscale="log", xlabel="catalogue items", ylabel="bytes per item")
    ax.legend(fontsize=8)
    ax = axes[2]
    meas = [r for r in users if r["measured"]]
    extra = [r for r in users if not r["measured"]]
    ax.plot([r["users"] for r in meas], [r["total_mib"] for r in meas], "o-", label="measured")
    if extra and meas:
        ax.plot(
            [meas[-1]["users"], *(r["users"] for r in extra)],
            [meas[-1]["total_mib"], *(r["total_mib"] for r in extra)],
            "o--",
            mfc="none",
            label="extrapolated",
        )
    ax.set(xscale="log", yscale="log", xlabel="users held", ylabel="user table MiB")
    ax.legend(fontsize=8)
    fig.suptitle("recsys bench scale: device cost vs size (synthetic, seeded)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
