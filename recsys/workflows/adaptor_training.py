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
  items would leak the target at replay time, so they are not used).
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

    {"format", "config", "dataset", "split", "ranker_path", "token_source", "bounds",
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
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from codebook.adaptor import Adaptor, AdaptorConfig, GeneratedEdit, edit_norms, payload_values
from codebook.duet import DuetConfig, DuetGenerator
from codebook.prototypes import PrototypeBank, PrototypeConfig, fit_prototypes
from codebook.semantic_ids import SemanticIdMap
from device_ranker.ranker import Ranker
from device_ranker.train import TrainConfig, library_versions
from recsys.data import Dataset, time_split, user_sequences
from recsys.errors import NotFoundError, ValidationError
from recsys.workflows.adaptor_data import (
    TOKEN_SOURCES,
    FrozenRanker,
    WindowConfig,
    WindowData,
    build_windows,
    ensure_time_ranker,
    generator_inputs,
    head_bounds,
    resolve_token_source,
    window_loss,
)

logger = logging.getLogger(__name__)

ARTIFACT_FORMAT = "recsys.adaptor_artifact.v1"


# ---- configuration ------------------------------------------------------------------------
@dataclass(frozen=True)
class LoopConfig:
    """Optimisation of a generator (identical for the adaptor and DUET)."""

    epochs: int = 40  # upper bound; early stopping ends sooner
    batch_size: int = 128  # request windows per step
    lr: float = 1e-3  # AdamW
    weight_decay: float = 1e-4
    grad_clip: float = 1.0  # max global gradient norm
    patience: int = 5  # epochs without a lower held-out loss before stopping
    holdout_users: float = 0.1  # share of training users kept for early stopping
    mask_seen: bool = True  # exclude already-seen items from the softmax (as evaluation does)
    seed: int = 0
    max_minutes: float | None = None  # wall-time budget per generator (stop after that epoch)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1 or self.lr <= 0:
            raise ValidationError(f"bad loop config {self}")
        if not 0.0 < self.holdout_users < 1.0:
            raise ValidationError(f"holdout_users must be in (0, 1), got {self.holdout_users}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValidationError(f"max_minutes must be > 0, got {self.max_minutes}")


@dataclass(frozen=True)
class AdaptorTrainConfig:
    """Everything ``recsys train adaptor`` trains (defaults: chosen on held-out training users).

    Example::

        AdaptorTrainConfig(rank=8, loop=LoopConfig(epochs=20))
    """

    quantile: float = 0.8  # time split: training period = events before this time quantile
    windows: WindowConfig = field(default_factory=WindowConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    rank: int = 8  # R of every generated layer edit
    bound_fraction: float = 0.5  # device ||dW||_F bound = this x min_l ||W_l||_F of the head
    bias_fraction: float = 1.0  # device |db| bound = this x max_l max|b_l|
    clip_fraction: float = 0.95  # generators clip to this share of the device bounds
    token_dim: int = 32  # E
    code_dim: int = 64  # C: edit code (prototypes cluster it)
    hidden: int = 128  # G: decoder GRU width
    dropout: float = 0.1
    token_source: str = "auto"  # "lm" if artifacts/NAME/lm holds a trained LM, else "recent"
    lm_backend: str = "transformers"  # llm_cloud backend for token_source "lm"
    duet_init_from_ranker: bool = True  # DUET's id table starts from the ranker's item table
    device_summary: bool = True  # feed the device summary [B, 2D] to both generators
    prototypes: PrototypeConfig = field(default_factory=PrototypeConfig)
    ranker: TrainConfig = field(default_factory=TrainConfig)  # used only if it must be trained
    seed: int = 0

    def __post_init__(self) -> None:
        if self.token_source not in TOKEN_SOURCES:
            raise ValidationError(f"token_source must be one of {TOKEN_SOURCES}")
        if not (self.bound_fraction > 0 and self.bias_fraction > 0 and 0 < self.clip_fraction <= 1):
            raise ValidationError("bound_fraction, bias_fraction > 0 and clip_fraction in (0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- the loop -------------------------------------------------------------------------------
@dataclass
class GeneratorResult:
    """Outcome of :func:`train_generator` (``model`` holds the best weights)."""

    model: torch.nn.Module
    history: list[dict[str, float]]
    best_epoch: int
    base_holdout: dict[str, float]
    seconds: float


def split_users(data: WindowData, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Window indices of training users and of held-out users (by user, seeded)."""
    users = np.unique(data.users)
    perm = np.random.default_rng(seed).permutation(users)
    held = set(perm[: max(1, round(share * len(users)))].tolist())
    is_held = np.array([u in held for u in data.users])
    return np.flatnonzero(~is_held), np.flatnonzero(is_held)


def _ndcg10(ranks: torch.Tensor) -> float:
    r = ranks.double()
    return float(torch.where(r <= 10, 1.0 / torch.log2(r + 1.0), torch.zeros_like(r)).mean())


def evaluate_windows(
    kind: str,
    model: torch.nn.Module | None,
    frozen: FrozenRanker,
    data: WindowData,
    idx: np.ndarray,
    mask_seen: bool,
    batch_size: int = 512,
) -> dict[str, float]:
    """Held-out next-window loss / NDCG@10 / HR@10 with the generator's edits (or none)."""
    losses, ranks = [], []
    if model is not None:
        model.eval()
    with torch.no_grad():
        for start in range(0, len(idx), batch_size):
            part = idx[start : start + batch_size]
            edit = None if model is None else model(*generator_inputs(kind, data, part))
            loss, r = window_loss(frozen, data, part, edit, mask_seen)
            losses.append(float(loss) * len(r))
            ranks.append(r)
    rk = torch.cat(ranks)
    return {
        "loss": sum(losses) / max(len(rk), 1),
        "ndcg@10": _ndcg10(rk),
        "hr@10": float((rk <= 10).double().mean()),
        "targets": len(rk),
    }


def train_generator(
    kind: str,
    model: torch.nn.Module,
    frozen: FrozenRanker,
    data: WindowData,
    loop: LoopConfig,
    *,
    progress: bool = True,
) -> GeneratorResult:
    """Train ``model`` (an :class:`Adaptor` for ``kind="adaptor"``, a
    :class:`DuetGenerator` for ``"duet"``) so its edits lower the next-window loss."""
    t0 = time.perf_counter()
    train_idx, held_idx = split_users(data, loop.holdout_users, loop.seed)
    base = evaluate_windows(kind, None, frozen, data, held_idx, loop.mask_seen)
    opt = torch.optim.AdamW(model.parameters(), lr=loop.lr, weight_decay=loop.weight_decay)
    # epoch 0 = the untrained generator, whose edit is exactly zero (s = 0, bias = 0): if no
    # epoch beats the frozen ranker on the held-out users, the identity edit is kept
    start = evaluate_windows(kind, model, frozen, data, held_idx, loop.mask_seen)
    best = {
        "loss": start["loss"],
        "epoch": 0,
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }
    history: list[dict[str, float | None]] = [
        {
            "epoch": 0,
            "train_loss": None,
            **{f"holdout_{k}": v for k, v in start.items() if k != "targets"},
            "seconds": 0.0,
        }
    ]
    bar = tqdm(total=loop.epochs, desc=f"train {kind}", disable=not progress, leave=False)
    bad = 0
    for epoch in range(1, loop.epochs + 1):
        te = time.perf_counter()
        torch.manual_seed(loop.seed * 100_003 + epoch)  # dropout
        order = np.random.default_rng([loop.seed, epoch]).permutation(train_idx)
        model.train()
        total, n = 0.0, 0
        for start in range(0, len(order), loop.batch_size):
            part = order[start : start + loop.batch_size]
            edit = model(*generator_inputs(kind, data, part))
            loss, _ = window_loss(frozen, data, part, edit, loop.mask_seen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), loop.grad_clip)
            opt.step()
            total += float(loss.detach())
            n += 1
        held = evaluate_windows(kind, model, frozen, data, held_idx, loop.mask_seen)
        history.append(
            {
                "epoch": epoch,
                "train_loss": total / max(n, 1),
                **{f"holdout_{k}": v for k, v in held.items() if k != "targets"},
                "seconds": time.perf_counter() - te,
            }
        )
        if held["loss"] < best["loss"] - 1e-5:
            best = {
                "loss": held["loss"],
                "epoch": epoch,
                "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            }
            bad = 0
        else:
            bad += 1
        bar.update(1)
        bar.set_postfix(
            loss=f"{held['loss']:.4f}", ndcg=f"{held['ndcg@10']:.4f}", base=f"{base['loss']:.4f}"
        )
        logger.info(
            "%s epoch %d: train %.4f, held-out loss %.4f (base %.4f), ndcg@10 %.4f (base %.4f)",
            kind,
            epoch,
            total / max(n, 1),
            held["loss"],
            base["loss"],
            held["ndcg@10"],
            base["ndcg@10"],
        )
        if bad >= loop.patience:
            break
        if time.perf_counter() - t0 > 60 * (loop.max_minutes or math.inf):
            logger.info(
                "%s: time budget of %.1f min reached after epoch %d", kind, loop.max_minutes, epoch
            )
            break
    bar.close()
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.eval()
    return GeneratorResult(model, history, int(best["epoch"]), base, time.perf_counter() - t0)


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


def artifact_dir(cache: Path, dataset: str) -> Path:
    return cache / "artifacts" / dataset / "adaptor"


def load_semantic_ids(cache: Path, dataset: str, codebook_dir: str | Path | None = None):
    """The dataset's semantic IDs (``artifacts/NAME/codebook``)."""
    path = Path(codebook_dir) if codebook_dir else cache / "artifacts" / dataset / "codebook"
    if not (path / "semantic_ids.npy").is_file():
        raise NotFoundError(
            f"no codebook at {path}; run `recsys train codebook --dataset {dataset}` first"
        )
    return SemanticIdMap.load(path)


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
        rk = torch.cat(ranks)
        out[name] = {
            "loss": sum(losses) / len(rk),
            "ndcg@10": _ndcg10(rk),
            "hr@10": float((rk <= 10).double().mean()),
            "targets": len(rk),
        }
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

    The prototype store defaults to a fresh SQLite file ``prototypes.sqlite`` beside it.
    """
    from codebook.store import PrototypeStore

    t0 = time.perf_counter()
    path = artifact_path or artifact_dir(cache, ds.name) / "adaptor.pt"
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
    tokens = resolve_token_source(
        cfg.token_source,
        ids,
        cfg.windows.input_items,
        lm_dir or cache / "artifacts" / ds.name / "lm",
        cfg.lm_backend,
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
    store_url = store_url or f"sqlite:///{out_dir / 'prototypes.sqlite'}"
    if store_url.startswith("sqlite:///"):
        Path(store_url.removeprefix("sqlite:///")).unlink(missing_ok=True)
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
    artifact = {
        "format": ARTIFACT_FORMAT,
        "config": cfg.to_dict(),
        "dataset": {"name": ds.name, "fingerprint": ds.fingerprint(), "num_items": ds.num_items},
        "split": split.summary() | {"quantile": cfg.quantile},
        "ranker_path": str(ranker_path),
        "token_source": data.token_source,
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
    )


def _decode_rows(model: torch.nn.Module, codes: np.ndarray) -> list[dict[str, torch.Tensor]]:
    with torch.no_grad():
        batched = model.decode(torch.from_numpy(np.asarray(codes, np.float32)))
    return [{k: v[i] for k, v in batched.items()} for i in range(len(codes))]


def load_artifact(path: Path) -> dict[str, Any]:
    """The saved artefact dict (plain tensors and Python values)."""
    if not path.is_file():
        raise NotFoundError(f"no trained adaptor at {path}; run `recsys train adaptor` first")
    art = torch.load(path, map_location="cpu", weights_only=True)
    if art.get("format") != ARTIFACT_FORMAT:
        raise ValidationError(f"{path} is not an adaptor artefact (format {art.get('format')!r})")
    return art


def generators_from_artifact(art: Mapping[str, Any]) -> tuple[Adaptor, DuetGenerator]:
    adaptor = Adaptor(AdaptorConfig.from_dict(art["adaptor_config"]))
    adaptor.load_state_dict(art["adaptor_state"])
    duet = DuetGenerator(DuetConfig.from_dict(art["duet_config"]))
    duet.load_state_dict(art["duet_state"])
    return adaptor.eval(), duet.eval()


def config_from_dict(data: Mapping[str, Any]) -> AdaptorTrainConfig:
    """Inverse of :meth:`AdaptorTrainConfig.to_dict`."""
    d = dict(data)
    d["windows"] = WindowConfig(**d["windows"])
    d["loop"] = LoopConfig(**d["loop"])
    d["prototypes"] = PrototypeConfig(**d["prototypes"])
    d["ranker"] = TrainConfig.from_dict(d["ranker"])
    return AdaptorTrainConfig(**d)


__all__ = [
    "AdaptorTrainConfig",
    "AdaptorTrainResult",
    "GeneratorResult",
    "LoopConfig",
    "config_from_dict",
    "evaluate_windows",
    "generators_from_artifact",
    "load_artifact",
    "make_generators",
    "prototype_holdout_check",
    "train_adaptor",
    "train_generator",
]
