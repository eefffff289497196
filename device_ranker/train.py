"""Training of the device ranker: ``train(cfg, dataset, ...) -> TrainResult``.

Data: each user's training events (time order) are cut, from the most recent backwards,
into windows of T + 1 events; the model reads the first T and predicts the next event
at every position (causal encoder), so every training event is a target once per epoch.

Loss: ``ce`` = full softmax cross-entropy over all I items (the catalogue is small, so
this is one [B*T, D] x [D, I] product per step and matches the full-ranking metric);
``bce`` = SASRec's sampled binary cross-entropy (one uniform negative per position).
Measured on ml-100k (SASRec encoder, D=64, T=50, 1 CPU thread, shared machine):

====  ========  ==============  =============  ============  ==========  =======
loss  patience  best / run      valid NDCG@10  test NDCG@10  test HR@10  seconds
====  ========  ==============  =============  ============  ==========  =======
ce    5         33 / 38 epochs  0.1155         0.1037        0.1994      268
bce   5         9 / 14 epochs   0.0787         0.0580        0.1124      65
bce   15        57 / 72 epochs  0.0961         0.0819        0.1633      310
====  ========  ==============  =============  ============  ==========  =======

Full softmax wins by ~0.02 test NDCG@10 at the same wall time (an epoch costs 7 s
against 4.3 s, but it needs half the epochs), so it is the default.

Early stopping: after every epoch the model ranks the validation targets (leave-one-out:
each user's second-to-last event, seen items excluded); training stops after
``patience`` epochs without a better NDCG@10 and the best weights are kept.

Determinism: model init uses ``seed``; epoch e draws its shuffling, negatives and
dropout from ``seed`` and e only, so a run resumed from a checkpoint after epoch e is
identical to an uninterrupted one.

Checkpoint (``torch.save`` of an explicit dict, written after every epoch)::

    {"format": "device_ranker.checkpoint.v1", "model_config", "train_config",
     "dataset": {"name", "fingerprint", "num_items", "num_users"}, "item_ids",
     "versions", "epoch", "model_state", "optimizer_state", "best_state",
     "best_epoch", "best_metric", "bad_epochs", "history", "finished"}

Example::

    cfg = TrainConfig(model=ModelConfig(num_items=0, dim=16, max_len=10), epochs=2)
    result = train(cfg, ds)               # leave-one-out train rows, valid targets
    result.best_valid["ndcg@10"], result.model
"""

from __future__ import annotations

import logging
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from tqdm.auto import tqdm

from device_ranker.config import ModelConfig
from device_ranker.evaluate import EvalSet, evaluate, loo_eval_set
from device_ranker.features import history_kjt
from device_ranker.model import SeqRanker
from recsys.data import Dataset, leave_one_out, user_sequences
from recsys.errors import ValidationError
from recsys.validation import config_dataclass

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "device_ranker.checkpoint.v1"


@config_dataclass
class TrainConfig:
    """Training hyper-parameters (defaults: measured on ml-100k, fit in ~2-3 min on 2 cores).

    ``model.num_items`` may be 0: :func:`train` fills it from the dataset.
    """

    model: ModelConfig = field(default_factory=lambda: ModelConfig(num_items=0))
    # "ce" full softmax over all items, or "bce" sampled (1 negative)
    loss: Literal["ce", "bce"] = "ce"
    epochs: int = Field(200, ge=1)  # upper bound; early stopping usually ends far sooner
    batch_size: int = Field(128, ge=1)  # windows per step (each window has up to T targets)
    lr: float = Field(1e-3, gt=0)  # AdamW
    weight_decay: float = Field(0.0, ge=0)  # dropout regularises enough at this size
    patience: int = Field(10, ge=1)  # epochs without a better valid NDCG@10 before stopping
    min_epochs: int = Field(1, ge=0)  # never stop before this many epochs
    seed: int = 0
    # wall-time budget: stop after the epoch that crosses it
    max_minutes: float | None = Field(None, gt=0)
    # optimizer of the embedding tables: "adamw" (one AdamW with the dense part), or
    # "adagrad" / "sgd" at embedding_lr: the only ones FBGEMM's fused CPU kernels offer for
    # tables sharded by TorchRec (device_ranker.distributed_train)
    embedding_optimizer: Literal["adamw", "adagrad", "sgd"] = "adamw"
    embedding_lr: float | None = Field(None, gt=0)  # None = lr

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        data["model"] = ModelConfig.from_dict(data["model"])
        return cls(**data)


@dataclass
class TrainResult:
    """What :func:`train` returns. ``model`` holds the best (early-stopped) weights."""

    model: SeqRanker
    config: TrainConfig
    best_epoch: int
    best_valid: dict[str, float]
    history: list[dict[str, float]]
    seconds: float
    checkpoint_path: Path | None = None


def library_versions() -> dict[str, str]:
    """Versions recorded in checkpoints (device_ranker must not import the CLI)."""
    out = {"python": platform.python_version()}
    for dist in ("torch", "torchrec", "fbgemm-gpu-cpu", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def make_windows(sequences: list[np.ndarray], max_len: int) -> list[np.ndarray]:
    """Cut each sequence from the end into windows of up to T + 1 events (>= 2 each).

    Consecutive windows overlap by one event, so every event after a user's first is a
    target exactly once.
    """
    out: list[np.ndarray] = []
    for seq in sequences:
        end = len(seq)
        while end >= 2:
            start = max(0, end - (max_len + 1))
            out.append(seq[start:end])
            end = start + 1
    return out


def holdout_last(
    sequences: list[np.ndarray], min_events: int = 3
) -> tuple[list[np.ndarray], EvalSet]:
    """Generic validation for arbitrary training rows: hold out each user's last event."""
    train_seqs, hists, targets, users = [], [], [], []
    for u, seq in enumerate(sequences):
        if len(seq) >= min_events:
            train_seqs.append(seq[:-1])
            hists.append(seq[:-1])
            targets.append(seq[-1])
            users.append(u)
        else:
            train_seqs.append(seq)
    return train_seqs, EvalSet(
        hists, np.asarray(targets, dtype=np.int64), np.asarray(users, dtype=np.int64)
    )


def _batch_loss(
    model: SeqRanker, windows: list[np.ndarray], loss: str, gen: torch.Generator
) -> torch.Tensor:
    t = model.cfg.max_len
    inputs = [w[:-1] for w in windows]
    states, _lengths = model.sequence_states(history_kjt(inputs, t))  # [B, T, D], [B]
    targets = torch.full((len(windows), t), -100, dtype=torch.int64)  # [B, T]
    for b, w in enumerate(windows):
        targets[b, : len(w) - 1] = torch.from_numpy(w[1:])
    valid = targets >= 0  # [B, T]
    q = model.head(states[valid])  # [N, D], N real positions
    tgt = targets[valid]  # [N]
    if loss == "ce":
        return F.cross_entropy(model.item_scores(q), tgt)  # logits [N, I]
    neg = torch.randint(0, model.cfg.num_items, tgt.shape, generator=gen)  # [N]
    table = model.item_table
    pos_logit = (q * table[tgt]).sum(-1) + model.item_bias[tgt]
    neg_logit = (q * table[neg]).sum(-1) + model.item_bias[neg]
    return F.binary_cross_entropy_with_logits(
        pos_logit, torch.ones_like(pos_logit)
    ) + F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit))


ADAGRAD_EPS = 1e-8  # FBGEMM's exact_adagrad default, so sharded and local runs agree


def make_optimizers(
    cfg: TrainConfig, dense: list[torch.nn.Parameter], tables: list[torch.nn.Parameter]
) -> list[torch.optim.Optimizer]:
    """AdamW over ``dense`` (and ``tables`` if ``embedding_optimizer`` is adamw), else a
    second optimizer (Adagrad or SGD at ``embedding_lr``) over the embedding ``tables``."""
    dense = [p for p in dense if p.requires_grad]
    tables = [p for p in tables if p.requires_grad]
    if cfg.embedding_optimizer == "adamw":
        return [torch.optim.AdamW(dense + tables, lr=cfg.lr, weight_decay=cfg.weight_decay)]
    opts: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(dense, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ]
    lr = cfg.embedding_lr or cfg.lr
    if tables:
        if cfg.embedding_optimizer == "adagrad":
            opts.append(torch.optim.Adagrad(tables, lr=lr, eps=ADAGRAD_EPS))
        else:
            opts.append(torch.optim.SGD(tables, lr=lr))
    return opts


def split_parameters(model: SeqRanker) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(dense parameters, TorchRec embedding-table parameters) of the ranker."""
    table_ids = {id(p) for p in model.embeddings.parameters()}
    dense = [p for p in model.parameters() if id(p) not in table_ids]
    return dense, list(model.embeddings.parameters())


def epoch_seeds(cfg: TrainConfig, epoch: int, num_windows: int) -> tuple[int, np.ndarray]:
    """(torch seed of epoch ``epoch``'s dropout and negatives, its window order [W])."""
    return cfg.seed * 100_003 + epoch, np.random.default_rng([cfg.seed, epoch]).permutation(
        num_windows
    )


def training_data(
    cfg: TrainConfig,
    dataset: Dataset,
    rows: np.ndarray | None = None,
    valid: EvalSet | None = None,
) -> tuple[TrainConfig, list[np.ndarray], EvalSet]:
    """(config with ``num_items`` filled, training windows, validation users); see :func:`train`."""
    mcfg = cfg.model if cfg.model.num_items else replace(cfg.model, num_items=dataset.num_items)
    if mcfg.num_items != dataset.num_items:
        raise ValidationError(
            f"model num_items {mcfg.num_items} != dataset items {dataset.num_items}"
        )
    cfg = replace(cfg, model=mcfg)
    if rows is None:
        split = leave_one_out(dataset)
        sequences = user_sequences(dataset, split.train)
        if valid is None:
            valid = loo_eval_set(dataset, split, "valid")
    else:
        sequences = user_sequences(dataset, np.asarray(rows))
        if valid is None:
            sequences, valid = holdout_last(sequences)
    windows = make_windows(sequences, mcfg.max_len)
    if not windows:
        raise ValidationError("no training windows: every user has fewer than 2 training events")
    logger.info(
        "training on %d windows (%d events), validating on %d users",
        len(windows),
        sum(len(s) for s in sequences),
        len(valid.targets),
    )
    return cfg, windows, valid


def initial_state() -> dict[str, Any]:
    """The early-stopping state of a training run before its first epoch."""
    return {
        "epoch": 0,
        "best_metric": -1.0,
        "best_epoch": 0,
        "bad_epochs": 0,
        "history": [],
        "best_state": None,
        "finished": False,
    }


def record_epoch(
    state: dict[str, Any],
    epoch: int,
    metrics: dict[str, float],
    mean_loss: float,
    seconds: float,
    weights: Callable[[], dict[str, torch.Tensor]],
) -> None:
    """Early-stopping bookkeeping after an epoch's validation (single-process and sharded
    training): a new best NDCG@10 keeps ``weights()`` (called only then) and resets the
    patience counter, otherwise the counter grows; the epoch's row joins the history."""
    if metrics["ndcg@10"] > state["best_metric"]:
        state.update(best_metric=metrics["ndcg@10"], best_epoch=epoch, bad_epochs=0)
        state["best_state"] = weights()
    else:
        state["bad_epochs"] += 1
    state["epoch"] = epoch
    state["history"].append(
        {
            "epoch": epoch,
            "loss": mean_loss,
            **{f"valid_{k}": v for k, v in metrics.items() if k != "users"},
            "seconds": seconds,
        }
    )


def dataset_info(dataset: Dataset) -> dict[str, Any]:
    """The checkpoint's ``dataset`` record."""
    return {
        "name": dataset.name,
        "fingerprint": dataset.fingerprint(),
        "num_items": dataset.num_items,
        "num_users": dataset.num_users,
    }


def model_score_fn(model: SeqRanker):
    """B histories -> [B, I] scores with the base head (for :func:`evaluate`)."""

    def fn(hs):
        return model(history_kjt(hs, model.cfg.max_len))

    return fn


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Atomic write of the checkpoint dict."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict (plain tensors and Python values only)."""
    ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValidationError(
            f"{path} is not a device ranker checkpoint (format {ckpt.get('format')!r})"
        )
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], which: str = "best_state") -> SeqRanker:
    """Rebuild the model from a checkpoint dict (``best_state`` or ``model_state``)."""
    model = SeqRanker(ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt[which])
    return model.eval()


def train(
    cfg: TrainConfig,
    dataset: Dataset,
    *,
    rows: np.ndarray | None = None,
    valid: EvalSet | None = None,
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train the ranker on ``rows`` of ``dataset`` with early stopping on ``valid``.

    Args:
        cfg: :class:`TrainConfig` (``model.num_items`` 0 = take it from the dataset).
        dataset: the canonical dataset.
        rows: training rows (positions into ``dataset.interactions``). Default: the
            leave-one-out train rows, with ``valid`` = the leave-one-out valid targets.
        valid: validation users; if None and ``rows`` is given, each user's last event
            in ``rows`` is held out (users with >= 3 events).
        checkpoint_path: write the checkpoint dict there after every epoch.
        resume: continue from ``checkpoint_path`` (same config and dataset required).
        progress: show a tqdm bar.
        on_step: called after every optimizer step with (epoch, batch loss).

    Returns:
        :class:`TrainResult` with the best model.
    """
    t0 = time.perf_counter()
    cfg, windows, valid = training_data(cfg, dataset, rows, valid)
    mcfg = cfg.model

    torch.manual_seed(cfg.seed)
    model = SeqRanker(mcfg)
    opt, *table_opt = make_optimizers(cfg, *split_parameters(model))
    dataset_record = dataset_info(dataset)
    state = initial_state()
    path = Path(checkpoint_path) if checkpoint_path else None
    if resume:
        if path is None or not path.is_file():
            raise ValidationError(f"--resume needs an existing checkpoint, {path} not found")
        ckpt = load_checkpoint(path)
        if ckpt.get("optimizer_state") is None:
            raise ValidationError(
                f"checkpoint {path} has no optimizer state (a sharded run); retrain without --resume"
            )
        if ckpt["dataset"]["fingerprint"] != dataset_record["fingerprint"]:
            raise ValidationError(
                f"checkpoint {path} was trained on dataset fingerprint {ckpt['dataset']['fingerprint']}, "
                f"this dataset is {dataset_record['fingerprint']}; retrain without --resume"
            )
        saved_cfg = TrainConfig.from_dict(ckpt["train_config"])
        if replace(saved_cfg, epochs=cfg.epochs, max_minutes=cfg.max_minutes) != cfg:
            raise ValidationError(
                f"checkpoint {path} has a different training config ({saved_cfg}); "
                "only `epochs` and `max_minutes` may change on resume"
            )
        model.load_state_dict(ckpt["model_state"])
        opt.load_state_dict(ckpt["optimizer_state"])
        for o in table_opt:
            o.load_state_dict(ckpt["embedding_optimizer_state"])
        for key in state:
            state[key] = ckpt[key]
        logger.info("resumed from %s after epoch %d", path, state["epoch"])

    bar = tqdm(
        total=cfg.epochs,
        initial=state["epoch"],
        desc="train ranker",
        disable=not progress,
        unit="epoch",
        leave=False,
    )
    deadline = time.perf_counter() + 60 * cfg.max_minutes if cfg.max_minutes else math.inf
    while state["epoch"] < cfg.epochs and not state["finished"]:
        epoch = state["epoch"] + 1
        te = time.perf_counter()
        epoch_seed, order = epoch_seeds(cfg, epoch, len(windows))
        torch.manual_seed(epoch_seed)  # dropout
        gen = torch.Generator().manual_seed(epoch_seed)  # negatives
        model.train()
        total, steps = 0.0, 0
        for start in range(0, len(order), cfg.batch_size):
            batch = [windows[i] for i in order[start : start + cfg.batch_size]]
            loss = _batch_loss(model, batch, cfg.loss, gen)
            for o in (opt, *table_opt):
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in (opt, *table_opt):
                o.step()
            total += float(loss.detach())
            steps += 1
            if on_step is not None:
                on_step(epoch, float(loss.detach()))
        model.eval()
        metrics = evaluate(model_score_fn(model), valid)
        score = metrics["ndcg@10"]
        record_epoch(
            state, epoch, metrics, total / max(steps, 1), time.perf_counter() - te,
            lambda: {k: v.detach().clone() for k, v in model.state_dict().items()},
        )  # fmt: skip
        if state["bad_epochs"] >= cfg.patience and epoch >= cfg.min_epochs:
            state["finished"] = True
        if time.perf_counter() > deadline and epoch >= cfg.min_epochs:
            logger.info("time budget of %.1f min reached after epoch %d", cfg.max_minutes, epoch)
            state["finished"] = True
        bar.update(1)
        bar.set_postfix(
            loss=f"{total / max(steps, 1):.3f}",
            ndcg10=f"{score:.4f}",
            best=f"{state['best_metric']:.4f}@{state['best_epoch']}",
        )
        logger.debug("epoch %d loss %.4f valid ndcg@10 %.4f", epoch, total / max(steps, 1), score)
        if path is not None:
            save_checkpoint(
                path,
                {
                    "format": CHECKPOINT_FORMAT,
                    "model_config": mcfg.to_dict(),
                    "train_config": cfg.to_dict(),
                    "dataset": dataset_record,
                    "item_ids": [str(i) for i in dataset.item_ids],
                    "versions": library_versions(),
                    "model_state": model.state_dict(),
                    "optimizer_state": opt.state_dict(),
                    **(
                        {"embedding_optimizer_state": table_opt[0].state_dict()}
                        if table_opt
                        else {}
                    ),
                    **state,
                },
            )
    bar.close()
    if state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    model.eval()
    best = next((h for h in state["history"] if h["epoch"] == state["best_epoch"]), {})
    return TrainResult(
        model=model,
        config=cfg,
        best_epoch=state["best_epoch"],
        best_valid={k.removeprefix("valid_"): v for k, v in best.items() if k.startswith("valid_")},
        history=state["history"],
        seconds=time.perf_counter() - t0,
        checkpoint_path=path,
    )
