"""The replay core's entry point: :func:`run_replay`, every policy on the same stream,
in process or through the real gRPC services.

:func:`run_replay` checks the artefacts and the policies, builds the stream
(:func:`recsys.replay.stream.build_stream`), calibrates the gate threshold of every
budget ONCE on the training period (:mod:`recsys.replay.gate_calibration`), checks that
the learned gate of "learned" policies was trained on this dataset and ranker with a
threshold for each budget (:func:`prepare_replay`), then hands the devices to a driver:

* ``via="inprocess"``: :func:`recsys.replay.replayer.replay_devices` (request points,
  edits, batched scoring in this process or ``workers`` spawned ones);
* ``via="grpc"``: :func:`recsys.replay.grpc_driver.replay_through_services` (a cloud and
  one device server per policy as child processes, every decision and score from them).

Both return one :class:`~recsys.replay.records.UserResult` per device, merged here
(:func:`~recsys.replay.records.merge_results`) into the run's records, sorted by
(timestamp, user), and cost summaries. A device's results depend only on its own
events (fixed thresholds, frozen prototype bank, per-device batches), so results are
identical for any worker count or concurrency.

Example::

    run = run_replay(ds, ReplayConfig(quick=True), default_policies((1.0, 0.2)),
                     cache=settings.cache_dir())
    run.records["system gate 20%"].summary()["ndcg@10"], run.costs["finetune every 5"]
    grpc = run_replay(ds, ReplayConfig(max_users=20), [PolicySpec("static")],
                      cache=settings.cache_dir(), via="grpc")
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from codebook.adaptor_artifact import artifact_dir, load_artifact
from device_ranker.learned_gate import load_gate_model
from device_ranker.ranker import Ranker
from recsys.data import Dataset, time_split, user_sequences
from recsys.errors import NotFoundError, ValidationError
from recsys.replay.config import GrpcOptions, PolicySpec, ReplayConfig
from recsys.replay.costs import scoring_flops
from recsys.replay.gate_calibration import GateCalibration, calibrate_gate
from recsys.replay.guard import apply_fleet_guards
from recsys.replay.records import EventRecords, merge_results
from recsys.replay.replayer import replay_devices
from recsys.replay.stream import ReplayStream, UserEvents, build_stream
from recsys.reporting import dataset_record, versions
from recsys.workflows.adaptor_config import config_from_dict

logger = logging.getLogger(__name__)

VIAS = ("inprocess", "grpc")


@dataclass
class ReplayRun:
    """What :func:`run_replay` returns.

    Attributes:
        records: policy label -> :class:`EventRecords` sorted by (timestamp, user).
        costs: policy label -> cost summary (:meth:`CostAccumulator.summary`, plus the
            services' measurements with ``via="grpc"``).
        meta: config, policies, dataset (name, fingerprint), seed, versions, split and
            stream summaries, gate calibrations, artefact, driver, timings.
    """

    records: dict[str, EventRecords]
    costs: dict[str, dict[str, Any]]
    meta: dict[str, Any]


class PreparedReplay(NamedTuple):
    """What every driver starts from (:func:`prepare_replay`)."""

    art_path: Path
    art: dict[str, Any]
    stream: ReplayStream
    calibrations: dict[float, GateCalibration]  # budget -> gate calibration

    def events(self) -> list[UserEvents]:
        """The devices' events, in user order."""
        return [self.stream.user_events(int(u)) for u in self.stream.users]


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


def learned_gate_path(ds: Dataset, cfg: ReplayConfig, art_path: Path) -> Path:
    """Where the learned gate's weights are: ``cfg.learned_gate`` or, by default,
    ``learned_gate.npz`` beside the adaptor artefact (``recsys replay train-gate``)."""
    if cfg.learned_gate:
        return Path(cfg.learned_gate)
    return art_path.with_name(f"{art_path.stem}.learned_gate.npz")


def check_learned_gate(
    ds: Dataset, path: Path, ranker_path: str, budgets: Sequence[float]
) -> dict[float, dict[str, float]]:
    """The learned gate at ``path`` was trained on ``ds`` with this ranker and has a
    threshold per budget: budget -> {threshold, train_rate}; else a clear error."""
    model = load_gate_model(path)
    if model.meta.get("dataset_fingerprint") != ds.fingerprint():
        raise ValidationError(
            f"the learned gate {path} was trained on another dataset (version); retrain it "
            f"with `recsys replay train-gate --dataset {ds.name}`"
        )
    if model.meta.get("ranker") != Path(ranker_path).name:
        raise ValidationError(
            f"the learned gate {path} was trained with the ranker {model.meta.get('ranker')}, "
            f"the artefact uses {Path(ranker_path).name}; retrain it"
        )
    return {
        b: {"threshold": model.threshold(b), "train_rate": model.train_rates.get(b, float("nan"))}
        for b in budgets
    }


def prepare_replay(
    ds: Dataset,
    cfg: ReplayConfig,
    policies: Sequence[PolicySpec],
    *,
    cache: Path,
    users: Sequence[int] | None = None,
) -> PreparedReplay:
    """Artefact checks, the stream and the gate calibration (shared by every driver)."""
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
    return PreparedReplay(art_path, art, stream, calibrations)


def prepare_learned_gate(
    ds: Dataset, cfg: ReplayConfig, specs: Sequence[PolicySpec], prep: PreparedReplay
) -> tuple[ReplayConfig, dict[float, dict[str, float]]]:
    """The config with the learned gate's path resolved, and budget -> its threshold and
    training rate ({} when no policy uses the learned gate)."""
    if not any(s.requests and s.trigger == "learned" for s in specs):
        return cfg, {}
    budgets = sorted({s.budget for s in specs if s.trigger == "learned" and s.budget < 1.0})
    path = learned_gate_path(ds, cfg, prep.art_path)
    learned = check_learned_gate(ds, path, prep.art["ranker_path"], budgets)
    return dataclasses.replace(cfg, learned_gate=str(path)), learned


def run_replay(
    ds: Dataset,
    cfg: ReplayConfig,
    policies: Sequence[PolicySpec],
    *,
    cache: Path,
    users: Sequence[int] | None = None,
    progress: bool = True,
    via: str = "inprocess",
    grpc: GrpcOptions | None = None,
) -> ReplayRun:
    """Replay the stream of ``ds`` through every policy (see the module docstring).

    Args:
        users: restrict to these dataset user indices (``cfg.quick`` / ``max_users`` then
            sample among them).
        progress: tqdm bars over devices.
        via: "inprocess" or "grpc" (the real services; static and system policies only).
        grpc: how to drive the services (``via="grpc"``; default :class:`GrpcOptions`).

    Raises:
        ValidationError: bad policies (or ones the services cannot run), bad config.
        NotFoundError: missing artefacts (the message names the training commands).
        RecsysError: with ``via="grpc"``, a server failed to start or (``grpc.strict``)
            an edit request failed.
    """
    if via not in VIAS:
        raise ValidationError(f"via must be one of {VIAS}, got {via!r}")
    t0 = time.perf_counter()
    specs = check_policies(policies)
    unsupported = [s.label for s in specs if s.guard or (s.requests and s.trigger == "learned")]
    if unsupported and (via == "grpc" or any(s.global_time for s in specs)):
        raise ValidationError(
            f"{unsupported}: the learned gate and the harm guard run in the in-process, "
            "per-device replay only (not through the services, not in global time)"
        )
    if via == "grpc":
        from recsys.replay.services import check_grpc_policies

        if any(s.global_time for s in specs):
            from recsys.replay.grpc_global import check_global_policies

            check_global_policies(specs)  # one system-live policy; no system-continual
        specs = check_grpc_policies(specs)
    prep = prepare_replay(ds, cfg, specs, cache=cache, users=users)
    cfg, learned = prepare_learned_gate(ds, cfg, specs, prep)
    if via == "grpc" and prep.art["token_source"] == "none":
        raise ValidationError(
            f"{prep.art_path} reads no tokens (token source none, the summary-only ablation); "
            "the cloud service has no such token source yet: replay it in process"
        )
    t_prep = time.perf_counter() - t0
    events = prep.events()
    extra: dict[str, Any] = {}
    if via == "inprocess":
        args = (prep.art_path, Path(cache), ds.name, cfg, specs, prep.calibrations)
        if any(s.global_time for s in specs):
            from recsys.replay.global_time import replay_global

            results, extra["global_time"] = replay_global(args, events, progress=progress)
        else:
            results = replay_devices(args, events, progress=progress)
            fleet = [s for s in specs if s.fleet_guard]
            levels = {s.label: s.guard_z for s in fleet if s.guard_z is not None}
            proof = {s.label for s in fleet if s.fleet_proof}
            evidence = apply_fleet_guards(results, cfg.guard, proof, levels)  # pools every device
            if evidence:
                extra["fleet_evidence"] = evidence
    else:
        if any(s.global_time for s in specs):
            from recsys.replay.grpc_global import (
                replay_global_through_services as replay_through_services,
            )
        else:
            from recsys.replay.grpc_driver import replay_through_services

        results, extra = replay_through_services(
            ds, cfg, specs, prep, events, cache=Path(cache), options=grpc or GrpcOptions(),
            progress=progress,
        )  # fmt: skip
    records, costs = merge_results(results, [s.label for s in specs])
    for label, more in extra.pop("costs", {}).items():  # per-server measurements
        costs[label].update(more)
    meta = run_meta(ds, cfg, specs, prep, Path(cache), via, learned)
    meta.update(extra, via=via)
    meta["seconds"] = {"prepare": t_prep, "total": time.perf_counter() - t0}
    return ReplayRun(records=records, costs=costs, meta=meta)


def run_meta(
    ds: Dataset,
    cfg: ReplayConfig,
    specs: Sequence[PolicySpec],
    prep: PreparedReplay,
    cache: Path,
    via: str = "inprocess",
    learned: dict[float, dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Everything a result needs besides the figures (config, data, versions, gate;
    ``learned``: budget -> the learned gate's threshold and training rate)."""
    art, art_path, stream, calibrations = prep.art, prep.art_path, prep.stream, prep.calibrations
    tcfg = config_from_dict(art["config"])
    head = [(int(o), int(i)) for _, o, i in art["adaptor_config"]["head_spec"]]
    dim = head[0][1]
    gate = {
        s.label: calibrations[s.budget].to_dict()
        for s in specs
        if s.kind in ("system", "duet") and s.trigger == "gate"
    }
    gate |= {
        s.label: learned[s.budget] | {"learned": True}
        for s in specs
        if s.requests and s.trigger == "learned" and learned and s.budget in learned
    }
    return {
        "dataset": dataset_record(ds, sizes=True),
        # results carry no machine-specific paths
        "config": cfg.to_dict()
        | {
            "artifact": display_path(Path(cfg.artifact), cache) if cfg.artifact else None,
            "learned_gate": display_path(Path(cfg.learned_gate), cache)
            if cfg.learned_gate
            else None,
            # a store URL may carry a password: the backend only
            "store_url": cfg.store_url.split(":", 1)[0] if cfg.store_url else None,
        },
        "seed": cfg.seed,
        "policies": [s.to_dict() for s in specs],
        "split": time_split(ds, quantile=cfg.quantile).summary() | {"quantile": cfg.quantile},
        "stream": stream.summary(),
        "replayed_users": stream.users.tolist(),
        "gate": gate,
        "artifact": display_path(art_path, cache),
        "token_source": art["token_source"],
        "lm_dir": _lm_display(art, cache, ds.name),
        "adaptor": {
            "rank": tcfg.rank,
            "window": tcfg.windows.window,
            "input_items": tcfg.windows.input_items,
            "bounds": art["bounds"],
        },
        "prototypes": {
            "mode": "frozen at the artefact's version 1 (no online refinement during replay)"
            + (
                "; system-live policies refine it online in global time"
                if any(s.global_time for s in specs)
                else ""
            )
            + (
                "; the cloud runs a copy of the artefact that never refines (the system-live "
                "cloud refines into the store)"
                if via == "grpc"
                else ""
            ),
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


def _lm_display(art: dict[str, Any], cache: Path, dataset: str) -> str | None:
    """The LM the artefact's tokens come from, as :func:`display_path` shows it (None
    when the adaptor reads no LM)."""
    if art["token_source"] != "lm":
        return None
    from codebook.adaptor_artifact import artifact_lm_dir

    return display_path(artifact_lm_dir(art, cache, dataset), cache)


def display_path(path: Path, cache: Path) -> str:
    """``CACHE/...`` for paths in the cache dir, else the file name (results carry no
    machine-specific paths)."""
    try:
        return "CACHE/" + str(Path(path).resolve().relative_to(Path(cache).resolve()))
    except ValueError:
        return Path(path).name


__all__ = [
    "VIAS",
    "PreparedReplay",
    "ReplayRun",
    "check_policies",
    "gate_budgets",
    "prepare_replay",
    "resolve_artifact",
    "run_replay",
]
