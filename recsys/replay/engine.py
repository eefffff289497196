"""The offline replay engine (in process): every policy on the same stream.

:func:`run_replay` checks the artefacts, builds the stream
(:func:`recsys.replay.stream.build_stream`), calibrates the gate threshold of every
budget ONCE on the training period (:mod:`recsys.replay.gate_calibration`), then
replays the devices (:class:`recsys.replay.replayer.Replayer`: request points, edits,
batched scoring) and merges the per-event records and costs.

A device's results depend only on its own events (fixed thresholds, frozen prototype
bank, per-device batches), so devices can be split across processes: they are cut
into fixed blocks of ``chunk_users`` (in user order) that ``workers`` spawned processes
(one torch thread each) take in turn; the merged records are sorted by (timestamp,
user). Results are identical for any worker count.

Example::

    run = run_replay(ds, ReplayConfig(quick=True), default_policies((1.0, 0.2)),
                     cache=settings.cache_dir())
    run.records["system gate 20%"].summary()["ndcg@10"], run.costs["finetune every 5"]
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from device_ranker.ranker import Ranker
from recsys.data import Dataset, time_split, user_sequences
from recsys.errors import NotFoundError, ValidationError
from recsys.replay.config import PolicySpec, ReplayConfig
from recsys.replay.costs import CostAccumulator, scoring_flops
from recsys.replay.gate_calibration import GateCalibration, calibrate_gate
from recsys.replay.policies import trigger_key
from recsys.replay.records import EventRecords
from recsys.replay.replayer import Replayer, UserResult
from recsys.replay.stream import ReplayStream, UserEvents, build_stream
from recsys.workflows.adaptor_training import artifact_dir, config_from_dict, load_artifact

logger = logging.getLogger(__name__)


@dataclass
class ReplayRun:
    """What :func:`run_replay` returns.

    Attributes:
        records: policy label -> :class:`EventRecords` sorted by (timestamp, user).
        costs: policy label -> cost summary (:meth:`CostAccumulator.summary`).
        meta: config, policies, dataset (name, fingerprint), seed, versions, split and
            stream summaries, gate calibrations, artefact, timings.
    """

    records: dict[str, EventRecords]
    costs: dict[str, dict[str, float]]
    meta: dict[str, Any]


def resolve_artifact(ds: Dataset, cfg: ReplayConfig, cache: Path) -> Path:
    """The adaptor artefact to replay with; a clear error naming the training commands."""
    path = Path(cfg.artifact) if cfg.artifact else artifact_dir(cache, ds.name) / "adaptor.pt"
    if not path.is_file():
        name = ds.name
        art = cache / "artifacts" / name
        steps = []
        if not (art / "codebook" / "semantic_ids.npy").is_file():
            steps.append(f"`recsys train codebook --dataset {name}`")
        if not (art / "lm" / "recsys_lm.json").is_file():
            steps.append(
                f"`recsys train lm --dataset {name}` (optional: without an LM the adaptor "
                "reads the recent items' IDs)"
            )
        steps.append(
            f"`recsys train adaptor --dataset {name}` (it trains the time-split ranker too)"
        )
        raise NotFoundError(
            f"no trained adaptor for {name} at {path}; train the missing artefacts first: "
            + ", then ".join(steps)
        )
    return path


def check_policies(policies: Sequence[PolicySpec]) -> list[PolicySpec]:
    """The policies as a list; ValidationError when empty, mistyped or labels repeat."""
    specs = list(policies)
    if not specs:
        raise ValidationError("no policies to replay")
    for s in specs:
        if not isinstance(s, PolicySpec):
            raise ValidationError(f"policies must be PolicySpec objects, got {type(s).__name__}")
    labels = [s.label for s in specs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValidationError(f"policy labels must be unique, repeated: {dup}")
    return specs


def gate_budgets(specs: Sequence[PolicySpec]) -> list[float]:
    """Budgets of the gate-triggered policies (each gets a calibrated threshold)."""
    return sorted({s.budget for s in specs if s.kind in ("system", "duet") and s.trigger == "gate"})


def prepare_replay(
    ds: Dataset,
    cfg: ReplayConfig,
    policies: Sequence[PolicySpec],
    *,
    cache: Path,
    users: Sequence[int] | None = None,
) -> tuple[Path, dict[str, Any], ReplayStream, dict[float, GateCalibration]]:
    """Artefact checks, the stream and the gate calibration (shared by every driver).

    Returns:
        (artefact path, artefact dict, stream, budget -> calibration).
    """
    specs = check_policies(policies)
    art_path = resolve_artifact(ds, cfg, cache)
    art = load_artifact(art_path)
    if art["dataset"]["fingerprint"] != ds.fingerprint():
        raise ValidationError(
            f"{art_path} was trained on another version of {ds.name}; retrain it with "
            f"`recsys train adaptor --dataset {ds.name}`"
        )
    tcfg = config_from_dict(art["config"])
    if abs(tcfg.quantile - cfg.quantile) > 1e-12:
        raise ValidationError(
            f"the adaptor was trained on the time split at quantile {tcfg.quantile}; replay "
            f"with the same quantile (got {cfg.quantile})"
        )
    if not Path(art["ranker_path"]).is_file():
        raise NotFoundError(
            f"the ranker {art['ranker_path']} named by {art_path} is missing; run "
            f"`recsys train adaptor --dataset {ds.name} --retrain-ranker`"
        )
    stream = build_stream(ds, cfg, users)
    if not stream.evaluated.any():
        raise ValidationError(
            f"no replay event of the selected users has a history of >= {cfg.min_history} "
            "events; select other users or lower --min-history"
        )
    calibrations: dict[float, GateCalibration] = {}
    budgets = gate_budgets(specs)
    if budgets:
        table = Ranker.from_checkpoint(art["ranker_path"]).model.item_table.detach().numpy()
        calibrations = calibrate_gate(
            table,
            user_sequences(ds, time_split(ds, quantile=cfg.quantile).train),
            budgets,
            window=cfg.gate_window,
            min_history=cfg.min_history,
            min_gap=cfg.gate_min_gap,
        )
    return art_path, art, stream, calibrations


# ---- worker processes ---------------------------------------------------------------------
_WORKER: Replayer | None = None


def _init_worker(args: tuple) -> None:
    global _WORKER
    torch.set_num_threads(1)
    _WORKER = Replayer(*args)


def _run_chunk(chunk: list[UserEvents]) -> list[UserResult]:
    if _WORKER is None:
        raise RuntimeError("replay worker used before its initialiser ran")
    return [_WORKER.replay_user(ev) for ev in chunk]


def run_replay(
    ds: Dataset,
    cfg: ReplayConfig,
    policies: Sequence[PolicySpec],
    *,
    cache: Path,
    users: Sequence[int] | None = None,
    progress: bool = True,
) -> ReplayRun:
    """Replay the stream of ``ds`` through every policy (see the module docstring).

    Args:
        users: restrict to these dataset user indices (``cfg.quick`` / ``max_users`` then
            sample among them).
        progress: a tqdm bar over devices.
    """
    t0 = time.perf_counter()
    specs = check_policies(policies)
    art_path, art, stream, calibrations = prepare_replay(ds, cfg, specs, cache=cache, users=users)
    t_prep = time.perf_counter() - t0
    events = [stream.user_events(int(u)) for u in stream.users]
    chunks = [events[i : i + cfg.chunk_users] for i in range(0, len(events), cfg.chunk_users)]
    init = (art_path, Path(cache), ds.name, cfg, specs, calibrations)
    results: list[UserResult] = []
    workers = min(cfg.workers, len(chunks))
    with tqdm(total=len(events), desc="replay", unit="device", disable=not progress) as bar:
        if workers <= 1:
            rep = Replayer(*init)
            try:
                for ev in events:
                    results.append(rep.replay_user(ev))
                    bar.update(1)
            finally:
                rep.close()
        else:
            with mp.get_context("spawn").Pool(
                workers, initializer=_init_worker, initargs=(init,)
            ) as pool:
                for part in pool.imap(_run_chunk, chunks):
                    results.extend(part)
                    bar.update(len(part))
                pool.close()  # let the workers exit on their own (no terminate)
                pool.join()
    records = {
        s.label: EventRecords.concat([r.records[s.label] for r in results]).sorted() for s in specs
    }
    costs = {}
    for s in specs:
        acc = CostAccumulator()
        for r in results:
            acc.merge(r.costs[s.label])
        costs[s.label] = acc.summary(len(records[s.label]))
    meta = run_meta(ds, cfg, specs, art, art_path, cache, stream, calibrations)
    meta["seconds"] = {"prepare": t_prep, "total": time.perf_counter() - t0}
    return ReplayRun(records=records, costs=costs, meta=meta)


def run_meta(
    ds: Dataset,
    cfg: ReplayConfig,
    specs: Sequence[PolicySpec],
    art: dict[str, Any],
    art_path: Path,
    cache: Path,
    stream: ReplayStream,
    calibrations: dict[float, GateCalibration],
) -> dict[str, Any]:
    """Everything a result needs besides the figures (config, data, versions, gate)."""
    from recsys.cli.common import versions

    tcfg = config_from_dict(art["config"])
    head = [(int(o), int(i)) for _, o, i in art["adaptor_config"]["head_spec"]]
    dim = head[0][1]
    gate = {
        s.label: calibrations[s.budget].to_dict()
        for s in specs
        if s.kind in ("system", "duet") and s.trigger == "gate"
    }
    return {
        "dataset": {
            "name": ds.name,
            "fingerprint": ds.fingerprint(),
            "users": ds.num_users,
            "items": ds.num_items,
        },
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "policies": [s.to_dict() for s in specs],
        "split": time_split(ds, quantile=cfg.quantile).summary() | {"quantile": cfg.quantile},
        "stream": stream.summary(),
        "replayed_users": stream.users.tolist(),
        "gate": gate,
        "artifact": display_path(art_path, cache),
        "token_source": art["token_source"],
        "adaptor": {
            "rank": tcfg.rank,
            "window": tcfg.windows.window,
            "input_items": tcfg.windows.input_items,
            "bounds": art["bounds"],
        },
        "prototypes": {
            "mode": "frozen at the artefact's version 1 (no online refinement during replay)",
            "count": len(art["prototype_centroids"]),
            "residual_rank": tcfg.prototypes.residual_rank,
        },
        "scoring_flops_per_event": scoring_flops(dim, head, ds.num_items),
        "protocol": {
            "ranking": "full catalogue, history items excluded, pessimistic ties",
            "auc": f"{cfg.negatives} sampled negatives per event, seeded by (seed, user, position)",
            "requests": "made from the history including the triggering event; they serve "
            "later events only",
        },
        "versions": versions(),
    }


def display_path(path: Path, cache: Path) -> str:
    """``CACHE/...`` for paths in the cache dir, else the file name (results carry no
    machine-specific paths)."""
    try:
        return "CACHE/" + str(Path(path).resolve().relative_to(Path(cache).resolve()))
    except ValueError:
        return Path(path).name


__all__ = [
    "ReplayRun",
    "UserEvents",
    "check_policies",
    "gate_budgets",
    "prepare_replay",
    "resolve_artifact",
    "run_replay",
    "trigger_key",
]
