"""First offline check of the adaptor on the replay period (``recsys eval adaptor``).

Protocol (everything here is configuration and is written into the results):

* **Split**: ``time_split(ds, quantile)`` with the quantile the adaptor was trained with
  (default 0.8). The frozen ranker and both generators saw only the training period.
* **Stream**: ALL replay-period events, warm users' (``split.replay``) and cold users'
  (``split.cold_replay``: on ml-100k 192 users who arrive after the cut plus one with a
  single training event; they produce most replay events), replayed in global time
  order. A device's history starts as its user's training-period events (empty for new
  users) and grows with the user's own replay events as they stream in.
* **Evaluated events**: every replay event whose history (training events + earlier
  replay events of that user) has at least ``min_history`` events (default 5, the same
  as the generators' ``min_history``): earlier events have no request yet, so every
  policy would rank them with the base model. The target is the event's item; the full
  catalogue is ranked with the history's items excluded (pessimistic ties): HR@10,
  NDCG@10, MRR@10. UAUC: per event ``negatives`` (default 100) items drawn uniformly,
  seeded, from the items not in the history and not the target, the same draws for every
  policy; AUC per event, pooled per user, averaged over users. The NDCG@10 difference to
  the static base gets a 95 % CI from a bootstrap over USERS (2,000 resamples, seeded),
  since one user's events are correlated.
* **Requests**: a device asks the cloud for an edit when it first has ``min_history``
  events and again after every ``refresh_every`` new events (default: the training
  window W), always from the history BEFORE the event being ranked; between requests it
  keeps its last edit. The edit travels as an :mod:`recsys.edit_payload` (fp16 by
  default), is decoded and validated on the device (``Ranker.prepare``: shapes, finite,
  ``EditBounds``) and applied by addition.

Policies:

* ``static base``: the frozen ranker, no edit.
* ``adaptor (no prototypes)``: the adaptor's edit for the device's tokens + summary.
* ``adaptor + prototypes``: the cloud assigns the device to the nearest prototype code,
  sends (prototype id, version, bounded residual); the prototype's code is refined with
  the device's code (new versions in the store, spawns); with ``prototype_sync="event"``
  (default) the device also picks up newer versions of its prototype at every event
  ("what changed since version v"), so its head is ``base + current prototype edit +
  its last residual``; with ``"request"`` it moves to the current version only when it
  requests an edit; with ``"lazy"`` the cloud computes the residual against the version
  the device already holds and moves it to the current one only when it changes
  prototype or lags ``max_version_lag`` versions behind (fewest downloads). The bytes of
  every prototype download are counted in the downlink.
* ``DUET-style``: the baseline generator from raw recent item ids.

Example::

    results = evaluate_adaptor(EvalConfig(), ds, cache=settings.cache_dir())
    results["policies"]["adaptor + prototypes"]["ndcg@10"]
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from codebook.adaptor import GeneratedEdit, unbatch
from codebook.prototypes import PrototypeBank
from device_ranker.edits import HeadEdit, PreparedEdit
from device_ranker.features import seen_mask
from device_ranker.head import head_forward_per_user
from device_ranker.ranker import Ranker
from recsys.data import Dataset, time_split, user_sequences
from recsys.edit_payload import decode_payload, dense_head_bytes, encode_payload
from recsys.errors import ValidationError
from recsys.metrics import hit_rate_at_k, mrr_at_k, ndcg_at_k, target_ranks, uauc
from recsys.workflows.adaptor_data import (
    FrozenRanker,
    device_bounds,
    device_summary,
    recent_items,
    resolve_token_source,
)
from recsys.workflows.adaptor_training import (
    artifact_dir,
    config_from_dict,
    generators_from_artifact,
    load_artifact,
    load_semantic_ids,
)

logger = logging.getLogger(__name__)

BASE, ADAPTOR, PROTO, DUET = (
    "static base",
    "adaptor (no prototypes)",
    "adaptor + prototypes",
    "DUET-style (item ids)",
)
POLICIES = (BASE, ADAPTOR, PROTO, DUET)
SYNC_MODES = ("event", "request", "lazy")


@dataclass(frozen=True)
class EvalConfig:
    """The replay protocol (see the module docstring)."""

    min_history: int = 5  # events before a device is evaluated and first requests an edit
    refresh_every: int | None = None  # events between requests; None = the training window W
    negatives: int = 100  # sampled negatives per event for UAUC
    payload_dtype: str = "fp16"  # downlink: "fp16", "int8" or "fp32"
    prototype_sync: str = "event"  # "event" / "request" / "lazy" (see the module docstring)
    max_version_lag: int = 10  # "lazy": versions a device may lag before it must update
    batch_size: int = 256  # events scored per batch
    log_edits: bool = True  # write every prototype-policy edit to the store's edit log
    seed: int = 0

    def __post_init__(self) -> None:
        if self.min_history < 1 or self.negatives < 1 or self.batch_size < 1:
            raise ValidationError("min_history, negatives and batch_size must be >= 1")
        if self.refresh_every is not None and self.refresh_every < 1:
            raise ValidationError("refresh_every must be >= 1")
        if self.max_version_lag < 1:
            raise ValidationError(f"max_version_lag must be >= 1, got {self.max_version_lag}")
        if self.prototype_sync not in SYNC_MODES:
            raise ValidationError(f"prototype_sync must be one of {SYNC_MODES}")


@dataclass
class _Device:
    """Per user and policy: the edit the device currently runs."""

    prepared: PreparedEdit | None = None
    last_request_len: int = -1
    residual: HeadEdit | None = None
    prototype_id: int | None = None
    prototype_version: int | None = None
    prototype_edit: HeadEdit | None = None


@dataclass
class _Costs:
    """Per policy: requests, downlink bytes and timings."""

    requests: int = 0
    payload_bytes: int = 0
    cloud_ms: list[float] = field(default_factory=list)
    device_us: list[float] = field(default_factory=list)
    prototype_downloads: int = 0
    prototype_bytes: int = 0


class _Scorer:
    """Buffers evaluated events and scores them for every policy in batches."""

    def __init__(self, ranker: Ranker, cfg: EvalConfig) -> None:
        self.ranker = ranker
        self.cfg = cfg
        self.buffer: list[tuple[np.ndarray, int, int, dict[str, PreparedEdit | None]]] = []
        self.ranks: dict[str, list[torch.Tensor]] = {p: [] for p in POLICIES}
        self.pos: dict[str, list[torch.Tensor]] = {p: [] for p in POLICIES}
        self.neg: dict[str, list[torch.Tensor]] = {p: [] for p in POLICIES}
        self.users: list[int] = []
        self.rng = np.random.default_rng(cfg.seed)

    def add(self, hist: np.ndarray, target: int, user: int, edits: dict) -> None:
        self.buffer.append((hist, target, user, edits))
        if len(self.buffer) >= self.cfg.batch_size:
            self.flush()

    def _negatives(self, hist: np.ndarray, target: int, num_items: int) -> np.ndarray:
        banned = np.zeros(num_items, dtype=bool)
        banned[hist] = True
        banned[target] = True
        pool = np.flatnonzero(~banned)
        n = self.cfg.negatives
        return self.rng.choice(pool, size=n, replace=len(pool) < n)  # tiny catalogues only

    def flush(self) -> None:
        if not self.buffer:
            return
        model = self.ranker.model
        hists = [b[0] for b in self.buffer]
        targets = torch.tensor([b[1] for b in self.buffer], dtype=torch.int64)
        self.users.extend(b[2] for b in self.buffer)
        num_items = self.ranker.num_items
        negs = torch.from_numpy(
            np.stack([self._negatives(h, t, num_items) for h, t, _, _ in self.buffer])
        )  # [B, M]
        exclude = seen_mask(hists, num_items)  # [B, I]
        base = model.head.base_weights()
        with torch.inference_mode():
            states = self.ranker.user_states(hists)  # [B, D]
            for policy in POLICIES:
                per = [b[3].get(policy) for b in self.buffer]
                if all(p is None for p in per):
                    q = model.head(states)
                else:
                    ws = [base if p is None else p.weights for p in per]
                    stacked = [
                        (torch.stack([w[i][0] for w in ws]), torch.stack([w[i][1] for w in ws]))
                        for i in range(len(base))
                    ]  # per layer W [B, out, in], b [B, out]
                    q = head_forward_per_user(states, stacked, model.head.residual)
                scores = model.item_scores(q)  # [B, I]
                self.ranks[policy].append(target_ranks(scores, targets, exclude))
                self.pos[policy].append(scores.gather(1, targets[:, None]).squeeze(1))
                self.neg[policy].append(scores.gather(1, negs))
        self.buffer.clear()

    def metrics(self) -> dict[str, dict[str, float]]:
        self.flush()
        users = torch.tensor(self.users)
        out = {}
        for p in POLICIES:
            r = torch.cat(self.ranks[p])
            out[p] = {
                "hr@10": float(hit_rate_at_k(r, 10).mean()),
                "ndcg@10": float(ndcg_at_k(r, 10).mean()),
                "mrr@10": float(mrr_at_k(r, 10).mean()),
                "uauc": uauc(torch.cat(self.pos[p]), torch.cat(self.neg[p]), users),
                "events": len(r),
                "users": len(torch.unique(users)),
            }
        return out

    def per_event_ndcg(self) -> dict[str, np.ndarray]:
        self.flush()
        return {p: ndcg_at_k(torch.cat(self.ranks[p]), 10).numpy() for p in POLICIES}


def _edit_from_payload(data: bytes, spec, rank: int) -> tuple[HeadEdit, Any]:
    payload = decode_payload(data, spec=spec, max_rank=rank)
    return HeadEdit.from_flat(payload.tensors), payload


def evaluate_adaptor(
    cfg: EvalConfig,
    ds: Dataset,
    *,
    cache: Path,
    artifact_path: Path | None = None,
    store_url: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Replay the later period through the four policies; returns every figure."""
    from codebook.store import PrototypeStore

    t0 = time.perf_counter()
    artifact_path = artifact_path or artifact_dir(cache, ds.name) / "adaptor.pt"
    art = load_artifact(artifact_path)
    if art["dataset"]["fingerprint"] != ds.fingerprint():
        raise ValidationError(
            f"{artifact_path} was trained on another version of {ds.name}; retrain the adaptor"
        )
    tcfg = config_from_dict(art["config"])
    refresh = cfg.refresh_every or tcfg.windows.window
    bounds = device_bounds(art["bounds"], tcfg.rank)
    ranker = Ranker.from_checkpoint(art["ranker_path"], bounds=bounds)
    frozen = FrozenRanker.from_ranker(ranker)
    spec = ranker.edit_spec()
    adaptor, duet = generators_from_artifact(art)
    ids = load_semantic_ids(cache, ds.name)
    tokens = resolve_token_source(
        art["token_source"],
        ids,
        tcfg.windows.input_items,
        cache / "artifacts" / ds.name / "lm",
        tcfg.lm_backend,
    )
    split = time_split(ds, quantile=tcfg.quantile)
    if int(split.cut) != int(art["split"]["cut_timestamp"]):
        raise ValidationError("the dataset's time split differs from the one the adaptor saw")
    histories = [list(map(int, s)) for s in user_sequences(ds, split.train)]
    stream = np.sort(np.concatenate([split.replay, split.cold_replay]))  # time order
    cold = set(split.cold_users.tolist())

    store_url = store_url or f"sqlite:///{artifact_path.parent / 'replay-store.sqlite'}"
    if store_url.startswith("sqlite:///"):
        Path(store_url.removeprefix("sqlite:///")).unlink(missing_ok=True)
    store = PrototypeStore.open(store_url, upgrade=True)
    pcfg = tcfg.prototypes
    bank = PrototypeBank.create(
        store,
        art["prototype_centroids"].numpy(),
        adaptor.decode,
        spec,
        pcfg,
        bound=art["bounds"]["device_max_weight_norm"],
        bias_bound=art["bounds"]["device_max_bias_abs"],
    )
    bank.spawn_threshold = float(art["prototypes"]["spawn_threshold"])

    devices: dict[str, dict[int, _Device]] = {p: {} for p in (ADAPTOR, PROTO, DUET)}
    costs = {p: _Costs() for p in (ADAPTOR, PROTO, DUET)}
    scorer = _Scorer(ranker, cfg)
    proto_payload_cache: dict[tuple[int, int], tuple[HeadEdit, int]] = {}
    wcfg = tcfg.windows

    proto_flat_cache: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def proto_flat(pid: int, version: int) -> dict[str, torch.Tensor]:
        """A prototype version's flat edit (cloud side; older versions from the store)."""
        key = (pid, version)
        if key not in proto_flat_cache:
            v, tensors = bank.edit(pid)
            if v != version:
                tensors = {
                    k: torch.from_numpy(a)
                    for k, a in store.get_prototype(pid, version).tensors.items()
                }
            proto_flat_cache[key] = tensors
        return proto_flat_cache[key]

    def proto_edit(pid: int, version: int) -> tuple[HeadEdit, int]:
        """Download (decode + validate) a prototype version; cached per (id, version)."""
        key = (pid, version)
        if key not in proto_payload_cache:
            data = encode_payload(
                proto_flat(pid, version), dtype=cfg.payload_dtype, prototype=(pid, version)
            )
            edit, _ = _edit_from_payload(data, spec, 2 * tcfg.rank)
            proto_payload_cache[key] = (edit, len(data))
        return proto_payload_cache[key]

    def request(user: int, hist: list[int]) -> None:
        h = np.asarray(hist, dtype=np.int64)
        with torch.inference_mode():  # device side: its state and summary (the uplink)
            state = ranker.user_states([h])
            summary = device_summary(frozen.item_table, [h], state, wcfg.summary_items)
        tc = time.perf_counter()
        with torch.inference_mode():  # cloud: tokens (LM or stand-in), one adaptor forward
            codes, scores = tokens([h])
            gen_a: GeneratedEdit = adaptor(
                torch.from_numpy(codes),
                None if scores is None else torch.from_numpy(scores),
                summary,
            )
        cloud_a = (time.perf_counter() - tc) * 1e3
        flat_a = unbatch(gen_a.tensors, 0)
        _deliver(ADAPTOR, user, len(hist), flat_a, None, cloud_a)
        # adaptor + prototypes: nearest prototype, bounded residual, online refinement
        tc = time.perf_counter()
        code = gen_a.code[0].numpy()
        pid = bank.assign(code)
        version, _ = bank.edit(pid)
        held = devices[PROTO].get(user)
        if (
            cfg.prototype_sync == "lazy"
            and held is not None
            and held.prototype_id == pid
            and version - held.prototype_version < cfg.max_version_lag
        ):  # the residual is taken against the version the device already holds
            version = held.prototype_version
        residual, rnorm = bank.residual_from(flat_a, proto_flat(pid, version))
        cloud_p = cloud_a + (time.perf_counter() - tc) * 1e3
        nbytes = _deliver(PROTO, user, len(hist), residual, (pid, version), cloud_p)
        bank.observe(f"user-{user}", code, rnorm, pid)
        if cfg.log_edits:
            store.log_edit(
                device_id=f"user-{user}",
                tokens="".join(ids.to_tokens(int(i)) for i in h[-3:]),
                prototype_id=pid,
                prototype_version=version,
                edit_norm=float(rnorm),
                payload_bytes=nbytes,
                latency_ms=cloud_p,
            )
        # DUET-style: raw recent ids, same summary
        tc = time.perf_counter()
        with torch.inference_mode():
            gen_d = duet(torch.from_numpy(recent_items([h], wcfg.input_items)), None, summary)
        cloud_d = (time.perf_counter() - tc) * 1e3
        _deliver(DUET, user, len(hist), unbatch(gen_d.tensors, 0), None, cloud_d)

    def _deliver(policy, user, hist_len, flat, proto, cloud_ms) -> int:
        """Encode on the cloud, decode + validate + apply on the device; returns bytes."""
        data = encode_payload(flat, dtype=cfg.payload_dtype, prototype=proto)
        c = costs[policy]
        c.requests += 1
        c.payload_bytes += len(data)
        c.cloud_ms.append(cloud_ms)
        td = time.perf_counter()
        edit, payload = _edit_from_payload(data, spec, 2 * tcfg.rank)  # on the device
        dev = devices[policy].setdefault(user, _Device())
        dev.last_request_len = hist_len
        if policy == PROTO:
            pedit, nbytes = proto_edit(payload.prototype_id, payload.prototype_version)
            if (dev.prototype_id, dev.prototype_version) != (
                payload.prototype_id,
                payload.prototype_version,
            ):
                c.prototype_downloads += 1
                c.prototype_bytes += nbytes
            dev.prototype_id, dev.prototype_version = (
                payload.prototype_id,
                payload.prototype_version,
            )
            dev.prototype_edit, dev.residual = pedit, edit
            dev.prepared = ranker.prepare(HeadEdit.compose(pedit, edit))
        else:
            dev.prepared = ranker.prepare(edit)
        c.device_us.append((time.perf_counter() - td) * 1e6)
        return len(data)

    def sync_prototype(user: int) -> None:
        dev = devices[PROTO].get(user)
        if dev is None or dev.prototype_id is None:
            return
        version, _ = bank.edit(dev.prototype_id)
        if version == dev.prototype_version:
            return
        pedit, nbytes = proto_edit(dev.prototype_id, version)  # "what changed since v"
        costs[PROTO].prototype_downloads += 1
        costs[PROTO].prototype_bytes += nbytes
        dev.prototype_version, dev.prototype_edit = version, pedit
        dev.prepared = ranker.prepare(HeadEdit.compose(pedit, dev.residual))

    evaluated_users: set[int] = set()
    cold_events = 0
    try:
        for row in tqdm(stream, desc="replay", disable=not progress, leave=False):
            user, item = int(ds.user_index[row]), int(ds.item_index[row])
            hist = histories[user]
            if len(hist) >= cfg.min_history:
                last = devices[ADAPTOR].get(user)
                if last is None or len(hist) - last.last_request_len >= refresh:
                    request(user, hist)
                elif cfg.prototype_sync == "event":
                    sync_prototype(user)
                edits = {BASE: None, **{p: devices[p][user].prepared for p in devices}}
                scorer.add(np.asarray(hist, dtype=np.int64), item, user, edits)
                evaluated_users.add(user)
                cold_events += user in cold
            hist.append(item)
        metrics = scorer.metrics()
        per_event = scorer.per_event_ndcg()
        changes = bank.summary()
        versions_stored = {pid: store.count_versions(pid) for pid in bank.prototype_ids}
        example = _changes_example(store, bank)
    finally:
        store.close()
        tokens.close()

    base_ndcg = metrics[BASE]["ndcg@10"]
    for p in POLICIES:
        c = costs.get(p)
        m = metrics[p]
        m["ndcg@10_rel_to_base"] = m["ndcg@10"] / base_ndcg - 1.0 if base_ndcg else float("nan")
        m["ndcg@10_diff_ci95"] = _user_bootstrap_ci(
            per_event[p] - per_event[BASE], np.asarray(scorer.users), cfg.seed
        )
        if c is None:
            m.update(requests=0, payload_bytes_mean=0.0, downlink_bytes_total=0)
            continue
        m.update(
            requests=c.requests,
            payload_bytes_mean=c.payload_bytes / max(c.requests, 1),
            payload_bytes_total=c.payload_bytes,
            downlink_bytes_total=c.payload_bytes + c.prototype_bytes,
            cloud_ms_p50=float(np.median(c.cloud_ms)) if c.cloud_ms else 0.0,
            device_apply_us_p50=float(np.median(c.device_us)) if c.device_us else 0.0,
            prototype_downloads=c.prototype_downloads,
            prototype_bytes_total=c.prototype_bytes,
        )
    return {
        "dataset": {
            "name": ds.name,
            "fingerprint": ds.fingerprint(),
            "users": ds.num_users,
            "items": ds.num_items,
        },
        "config": asdict(cfg) | {"refresh_every_resolved": refresh},
        "train_config": art["config"],
        "seed": cfg.seed,
        "token_source": art["token_source"],
        "artifact": str(artifact_path),
        "ranker": art["ranker_path"],
        "store_url": store_url,
        "split": split.summary() | {"quantile": tcfg.quantile},
        "protocol": {
            "stream_events": len(stream),
            "evaluated_events": metrics[BASE]["events"],
            "evaluated_users": len(evaluated_users),
            "evaluated_cold_user_events": cold_events,
            "evaluated_warm_user_events": metrics[BASE]["events"] - cold_events,
            "skipped_events_short_history": len(stream) - metrics[BASE]["events"],
            "min_history": cfg.min_history,
            "refresh_every": refresh,
            "negatives": cfg.negatives,
            "ranking": "full catalogue, history items excluded, pessimistic ties",
        },
        "policies": metrics,
        "bounds": art["bounds"],
        "head": art["head"],
        "sizes": {
            "dense_head_fp32_bytes": dense_head_bytes(spec, 4),
            "dense_head_fp16_bytes": dense_head_bytes(spec, 2),
            "lowrank_values_per_edit": art["payload_values_per_edit"],
        },
        "prototypes": changes
        | {"versions_stored": versions_stored, "changes_since_example": example},
        "seconds": time.perf_counter() - t0,
    }


def _user_bootstrap_ci(
    diff: np.ndarray, users: np.ndarray, seed: int, rounds: int = 2000
) -> list[float]:
    """95 % percentile-bootstrap CI of the mean per-event NDCG@10 difference (policy - base),
    resampling USERS (a user's events are correlated), seeded."""
    if len(diff) < 2:
        return [float("nan"), float("nan")]
    uniq, inv = np.unique(users, return_inverse=True)
    sums = np.bincount(inv, weights=diff, minlength=len(uniq))  # [U]
    counts = np.bincount(inv, minlength=len(uniq)).astype(np.float64)  # [U]
    rng = np.random.default_rng([seed, 7])
    draws = rng.integers(0, len(uniq), size=(rounds, len(uniq)))  # [rounds, U]
    means = sums[draws].sum(1) / counts[draws].sum(1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return [float(lo), float(hi)]


def _changes_example(store, bank: PrototypeBank) -> dict[str, Any]:
    """ "What changed since version 1" for the most refined prototype (for the report)."""
    if not bank.live:
        return {}
    pid = max(bank.live, key=lambda p: bank.live[p].version)
    changes = store.changes_since(pid, 1)
    return {
        "prototype_id": pid,
        "since_version": 1,
        "versions": [c.version for c in changes][:20],
        "reasons": sorted({c.reason for c in changes}),
        "count": len(changes),
    }


def result_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The printed table: one row per policy."""
    rows = []
    for p in POLICIES:
        m = results["policies"][p]
        rows.append(
            {
                "policy": p,
                "events": m["events"],
                "hr@10": m["hr@10"],
                "ndcg@10": m["ndcg@10"],
                "vs base": f"{100 * m['ndcg@10_rel_to_base']:+.1f}%",
                "diff 95% CI": "-"
                if p == BASE
                else "[{:+.4f}, {:+.4f}]".format(*m["ndcg@10_diff_ci95"]),
                "uauc": m["uauc"],
                "requests": m["requests"],
                "payload B": round(m["payload_bytes_mean"]) if m["requests"] else "-",
                "downlink MB": f"{m['downlink_bytes_total'] / 1e6:.1f}" if m["requests"] else "-",
            }
        )
    return rows
