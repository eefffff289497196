"""Sharded training of the device ranker with TorchRec ``DistributedModelParallel`` (DMP).

The single-process :func:`device_ranker.train.train` stays the default; this trains the
same :class:`~device_ranker.model.SeqRanker` on N processes (``torch.distributed``, gloo on
CPU, nccl on GPUs) and writes the same checkpoint format, so everything that loads a
ranker loads the result.

How a step is split::

    global batch (the single-process run's windows, same order)  -> N contiguous slices
    rank r: KJT of its slice's histories + one extra row with all I item ids
      -> sharded EmbeddingCollection (TorchRec all-to-all)   [b_r, T, D] + item table [I, D]
      -> encoder, head, logits against the looked-up table   (dense part: DDP)
      -> summed loss of its positions * N / (positions in the global batch)

The item table is tied (history lookup and scoring), and a sharded table is only reachable
through the lookup, so each rank looks every item up once per step in the same KJT: the
table's gradient then has both terms, and because every row is touched every step the
fused row-sparse update equals the dense one. DDP averages the dense gradients over the N
ranks and TorchRec divides the embedding gradients by N too (``comm_ops`` gradient
division), which the ``* N`` undoes: every gradient is the global-batch mean's, as in
the single-process run.

Sharding on CPU (torchrec 1.8, fbgemm-gpu-cpu 1.8, gloo): ``EmbeddingCollectionSharder``
offers data_parallel, table_wise, row_wise and column_wise. The three model-parallel
types train here (the planner picks row_wise; ``sharding="auto"`` on CPU chooses among
them) and run FBGEMM's fused kernel, whose CPU build accepts only the exact SGD / Adagrad
/ row-wise Adagrad optimizers (``Optimizer adam is not supported in CPU mode``), so they
need ``embedding_optimizer`` sgd or adagrad; the planner refuses the non-fused kernel
for them (``DENSE kernel requires DATA_PARALLEL sharding``). data_parallel fails on CPU:
FBGEMM's CPU ``DenseTableBatchedEmbeddingBagsCodegen`` pools despite
``PoolingMode.NONE``, so a sequence lookup returns one row per bag. Both are refused by
:func:`check_config` before any process starts. On GPUs (nccl) AdamW tables map to
FBGEMM's fused Adam (weight decay 0); not tested here.

Exactness: with dropout 0 the per-step losses match the single-process run up to float
summation order (``tests/device_ranker/test_ranker_dmp.py``). With dropout > 0 each rank
draws its own masks, so runs agree in distribution, not per step. Sampled negatives
(``loss="bce"``) are drawn for the whole global batch on every rank and sliced, so they
match. Resuming a sharded run is not supported (its checkpoint has no optimizer state).

Example::

    cfg = TrainConfig(model=ModelConfig(num_items=0, dim=16, max_len=10), epochs=2,
                      embedding_optimizer="adagrad", embedding_lr=0.05)
    out = train_distributed(cfg, ds, DistributedConfig(world_size=2, sharding="row_wise"))
    out.result.best_valid, out.plan       # {'ndcg@10': ...}, {'item': 'row_wise/fused ...'}

Multi-node (untested here): start the ``recsys train ranker --world-size N`` command under
``torchrun``; a process that finds ``RANK``/``WORLD_SIZE`` in its environment joins that
group instead of spawning its own.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from device_ranker.evaluate import EvalSet, evaluate
from device_ranker.features import ITEM_FEATURE, history_kjt
from device_ranker.model import SeqRanker
from device_ranker.train import (
    ADAGRAD_EPS,
    CHECKPOINT_FORMAT,
    TrainConfig,
    TrainResult,
    dataset_info,
    epoch_seeds,
    initial_state,
    library_versions,
    model_score_fn,
    record_epoch,
    save_checkpoint,
    training_data,
)
from recsys.data import Dataset
from recsys.errors import ValidationError
from recsys.validation import config_dataclass

logger = logging.getLogger(__name__)

SHARDING_TYPES = ("data_parallel", "table_wise", "row_wise", "column_wise")
MODEL_PARALLEL = ("table_wise", "row_wise", "column_wise")


@config_dataclass
class DistributedConfig:
    """Process group and sharding of a DMP run.

    Example::

        DistributedConfig(world_size=2, sharding="column_wise")
    """

    world_size: int = Field(2, ge=1)  # processes (one per GPU with nccl)
    # "auto" = the TorchRec planner's choice, else forced for every table
    sharding: Literal["auto", "data_parallel", "table_wise", "row_wise", "column_wise"] = "auto"
    backend: Literal["gloo", "nccl"] = "gloo"  # nccl: one CUDA device per local rank
    threads: int = Field(1, ge=1)  # torch intra-op threads per process
    master_addr: str = "127.0.0.1"
    master_port: int = Field(0, ge=0, le=65535)  # 0 = a free port (single machine)


@dataclass
class DistributedTrainResult:
    """What :func:`train_distributed` returns on rank 0.

    ``plan``: table -> "sharding_type/compute_kernel" as the planner (or the constraint)
    chose; ``step_losses``: (epoch, global-batch loss) after every step.
    """

    result: TrainResult
    plan: dict[str, str]
    step_losses: list[tuple[int, float]] = field(default_factory=list)


def check_config(cfg: TrainConfig, dcfg: DistributedConfig) -> None:
    """Refuse combinations the installed kernels cannot run, before any process starts."""
    if cfg.model.extra_features:
        raise ValidationError("sharded training supports the item history only (no extra features)")
    if dcfg.backend != "gloo":
        return
    if dcfg.sharding == "data_parallel":
        raise ValidationError(
            "data_parallel sharding of the ranker's EmbeddingCollection fails on CPU: FBGEMM's "
            "CPU DenseTableBatchedEmbeddingBagsCodegen (fbgemm-gpu-cpu 1.8) pools despite "
            "PoolingMode.NONE (one row per bag instead of one per id); use table_wise, "
            "row_wise or column_wise"
        )
    if cfg.embedding_optimizer == "adamw":
        raise ValidationError(
            "sharded tables on CPU run FBGEMM's fused kernel, whose CPU build has no Adam/AdamW "
            "(only exact SGD / Adagrad / row-wise Adagrad); use embedding_optimizer 'adagrad' "
            "or 'sgd' (--embedding-optimizer, with --embedding-lr)"
        )


class _TrainStep(nn.Module):
    """The ranker plus its loss on one rank's slice (the module DMP shards).

    ``forward(kjt, targets, negatives)``: KJT with stride b + 1 (b histories, then one row
    holding item ids 0..I-1), targets [b, T] (-100 = no target), negatives [n] or None
    -> summed loss over the n real positions (scalar).
    """

    def __init__(self, ranker: SeqRanker) -> None:
        super().__init__()
        self.ranker = ranker

    def forward(
        self, kjt: Any, targets: torch.Tensor, negatives: torch.Tensor | None
    ) -> torch.Tensor:
        r = self.ranker
        b, t, num_items = targets.shape[0], r.cfg.max_len, r.cfg.num_items
        item = r.embeddings(kjt)[ITEM_FEATURE]
        x = item.to_padded_dense(desired_length=t, padding_value=0.0)[:b]  # [b, T, D]
        table = item.values()[-num_items:]  # [I, D], the last row's lookup
        lengths = item.lengths()[:b].to(torch.int64)  # [b]
        states = r.encode_dense(x, lengths)  # [b, T, D]
        valid = targets >= 0
        q = r.head(states[valid])  # [n, D]
        tgt = targets[valid]  # [n]
        if negatives is None:
            return F.cross_entropy(F.linear(q, table, r.item_bias), tgt, reduction="sum")
        pos = (q * table[tgt]).sum(-1) + r.item_bias[tgt]
        neg = (q * table[negatives]).sum(-1) + r.item_bias[negatives]
        return F.binary_cross_entropy_with_logits(
            pos, torch.ones_like(pos), reduction="sum"
        ) + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg), reduction="sum")


@dataclass
class _Job:
    """Everything a rank needs (pickled to spawned processes)."""

    cfg: TrainConfig
    dcfg: DistributedConfig
    windows: list[np.ndarray]
    valid: EvalSet
    dataset: dict[str, Any]
    item_ids: list[str]
    checkpoint_path: Path | None
    result_path: Path | None
    progress: bool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _embedding_optimizer(cfg: TrainConfig) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The torch optimizer TorchRec turns into the fused FBGEMM one (EXACT_SGD, EXACT_ADAGRAD,
    ADAM on GPU; AdamW = Adam while weight_decay is 0)."""
    lr = cfg.embedding_lr or cfg.lr
    if cfg.embedding_optimizer == "adagrad":
        return torch.optim.Adagrad, {"lr": lr, "eps": ADAGRAD_EPS}
    if cfg.embedding_optimizer == "sgd":
        return torch.optim.SGD, {"lr": lr}
    if cfg.weight_decay:
        raise ValidationError(
            "sharded AdamW tables need weight_decay 0 (FBGEMM's Adam is not AdamW)"
        )
    return torch.optim.Adam, {"lr": cfg.lr}


def _plan(step: _TrainStep, dcfg: DistributedConfig, cfg: TrainConfig, device: torch.device):
    """(sharder, TorchRec sharding plan) agreed by all ranks (the planner runs on rank 0)."""
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
    from torchrec.distributed.planner.storage_reservations import (
        FixedPercentageStorageReservation,
    )
    from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig

    if dcfg.sharding != "auto":
        types = [dcfg.sharding]
    elif device.type == "cpu":
        types = list(MODEL_PARALLEL)  # data_parallel is broken there (check_config)
    else:
        types = None
    # column_wise: shards of D / N columns (the planner's default keeps a small D whole)
    dim = cfg.model.dim
    split = dim // dcfg.world_size if dcfg.sharding == "column_wise" else None
    constraints = (
        {
            name: ParameterConstraints(sharding_types=types, min_partition=split or None)
            for name in step.ranker.embeddings.embeddings
        }
        if types
        else None
    )
    topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=dcfg.world_size),
        kernel_config=KernelConfig(compute_device=device.type),
    )
    sharder = EmbeddingCollectionSharder()
    # a fixed 15 % reserve (the default heuristic one warns that it over-estimates)
    planner = EmbeddingShardingPlanner(
        topology=topology,
        constraints=constraints,
        storage_reservation=FixedPercentageStorageReservation(0.15),
    )
    return sharder, planner.collective_plan(step, [sharder], dist.group.WORLD)


def plan_summary(plan: Any) -> dict[str, str]:
    """Sharding plan -> {table: "sharding_type/compute_kernel ranks [..] shards [(rows, cols)]"}."""
    out = {}
    for module_plan in plan.plan.values():
        for name, ps in module_plan.items():
            shards = (
                [tuple(s.shard_sizes) for s in ps.sharding_spec.shards] if ps.sharding_spec else []
            )
            out[name] = f"{ps.sharding_type}/{ps.compute_kernel} ranks {ps.ranks} shards {shards}"
    return out


def _shard_slices(value: Any) -> list[tuple[torch.Tensor, tuple[slice, ...]]]:
    """Local pieces of a state-dict entry: [(tensor, where it sits in the full tensor)]."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    if isinstance(value, ShardedTensor):
        return [
            (
                s.tensor,
                tuple(
                    slice(o, o + n)
                    for o, n in zip(s.metadata.shard_offsets, s.metadata.shard_sizes, strict=True)
                ),
            )
            for s in value.local_shards()
        ]
    if isinstance(value, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(
            value.shape, value.device_mesh, value.placements
        )
        return [
            (value.to_local(), tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True)))
        ]
    return [(value, tuple(slice(None) for _ in value.shape))]


def _local_state(dmp: nn.Module) -> dict[str, list[tuple[torch.Tensor, tuple[slice, ...]]]]:
    """The DMP state dict by ranker key ("embeddings.embeddings.item.weight", ...)."""
    out = {}
    for key, value in dmp.state_dict().items():
        name = key.split("ranker.", 1)[1] if "ranker." in key else key
        out[name] = _shard_slices(value)
    return out


@torch.no_grad()
def load_full_state(dmp: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy an unsharded ranker state dict into the local shards of every rank."""
    local = _local_state(dmp)
    if local.keys() != full.keys():
        raise ValidationError(f"sharded state keys {sorted(local)} != ranker keys {sorted(full)}")
    for name, pieces in local.items():
        for tensor, where in pieces:
            tensor.copy_(full[name][where].to(tensor.device))


@torch.no_grad()
def gather_full_state(
    dmp: nn.Module, like: dict[str, torch.Tensor], rank: int
) -> dict[str, torch.Tensor] | None:
    """All ranks' shards -> the unsharded ranker state dict on rank 0 (None elsewhere)."""
    local = {
        name: [(t.detach().cpu(), where) for t, where in pieces]
        for name, pieces in _local_state(dmp).items()
    }
    parts: list[Any] | None = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(local, parts, dst=0)
    if rank != 0:
        return None
    full = {name: torch.empty_like(t) for name, t in like.items()}
    for part in parts or []:
        for name, pieces in part.items():
            for tensor, where in pieces:
                full[name][where] = tensor
    return full


def _rank_batch(
    batch: list[np.ndarray], rank: int, world: int, num_items: int, max_len: int
) -> tuple[Any, torch.Tensor, slice, int]:
    """A global batch -> (this rank's KJT, its targets [b, T], its slice of the global
    positions, global positions N). An empty slice becomes one empty history."""
    sizes = [len(w) - 1 for w in batch]
    bounds = np.linspace(0, len(batch), world + 1).round().astype(int)
    lo, hi = int(bounds[rank]), int(bounds[rank + 1])
    mine = batch[lo:hi]
    inputs = [w[:-1] for w in mine] or [np.zeros(0, dtype=np.int64)]
    targets = torch.full((len(inputs), max_len), -100, dtype=torch.int64)  # [b, T]
    for b, w in enumerate(mine):
        targets[b, : len(w) - 1] = torch.from_numpy(w[1:])
    kjt = history_kjt([*inputs, np.arange(num_items)], max(max_len, num_items))
    start = sum(sizes[:lo])
    return kjt, targets, slice(start, start + sum(sizes[lo:hi])), sum(sizes)


def _run_rank(rank: int, job: _Job) -> DistributedTrainResult | None:
    """One process of the group (already initialised): train, rank 0 evaluates and saves."""
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    cfg, dcfg = job.cfg, job.dcfg
    world = dist.get_world_size()
    t0 = time.perf_counter()
    torch.set_num_threads(dcfg.threads)
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        if dcfg.backend == "nccl"
        else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)  # nccl collectives and gather_object use it
    torch.manual_seed(cfg.seed)
    ranker = SeqRanker(cfg.model)
    init_state = {k: v.detach().clone() for k, v in ranker.state_dict().items()}
    step = _TrainStep(ranker)
    opt_cls, opt_kw = _embedding_optimizer(cfg)
    apply_optimizer_in_backward(opt_cls, list(ranker.embeddings.parameters()), opt_kw)
    sharder, plan = _plan(step, dcfg, cfg, device)
    with warnings.catch_warnings():  # torchrec's DDP wrapper passes broadcast_buffers
        warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
        dmp = DistributedModelParallel(
            step,
            env=ShardingEnv.from_process_group(dist.group.WORLD),
            device=device,
            plan=plan,
            sharders=[sharder],
        )
    load_full_state(dmp, init_state)
    dense = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(dense, lr=cfg.lr, weight_decay=cfg.weight_decay)
    summary = plan_summary(plan)
    if rank == 0:
        logger.info("sharding plan on %d ranks: %s", world, summary)
        eval_model = SeqRanker(cfg.model)

    state = initial_state()
    step_losses: list[tuple[int, float]] = []
    bar = tqdm(
        total=cfg.epochs,
        desc=f"train ranker x{world}",
        disable=not job.progress or rank != 0,
        unit="epoch",
        leave=False,
    )
    deadline = time.perf_counter() + 60 * cfg.max_minutes if cfg.max_minutes else math.inf
    num_items, max_len = cfg.model.num_items, cfg.model.max_len
    while state["epoch"] < cfg.epochs and not state["finished"]:
        epoch = state["epoch"] + 1
        te = time.perf_counter()
        epoch_seed, order = epoch_seeds(cfg, epoch, len(job.windows))
        torch.manual_seed(epoch_seed + 7919 * rank)  # dropout: each rank its own masks
        gen = torch.Generator().manual_seed(epoch_seed)  # negatives: the global draw
        dmp.train()
        total, steps = 0.0, 0
        for start in range(0, len(order), cfg.batch_size):
            batch = [job.windows[i] for i in order[start : start + cfg.batch_size]]
            kjt, targets, where, n = _rank_batch(batch, rank, world, num_items, max_len)
            negatives = (
                torch.randint(0, num_items, (n,), generator=gen)[where].to(device)
                if cfg.loss == "bce"
                else None
            )
            loss_sum = dmp(kjt.to(device), targets.to(device), negatives)
            opt.zero_grad(set_to_none=True)
            (loss_sum * (world / n)).backward()
            opt.step()
            reported = loss_sum.detach().reshape(1).clone()
            dist.all_reduce(reported)
            loss = float(reported) / n
            total += loss
            steps += 1
            step_losses.append((epoch, loss))
        full = gather_full_state(dmp, init_state, rank)
        decision = [False]
        if rank == 0:
            eval_model.load_state_dict(full)
            eval_model.eval()
            metrics = evaluate(model_score_fn(eval_model), job.valid)
            record_epoch(
                state, epoch, metrics, total / max(steps, 1), time.perf_counter() - te,
                lambda full=full: full,
            )  # fmt: skip
            stop = state["bad_epochs"] >= cfg.patience or time.perf_counter() > deadline
            state["finished"] = stop and epoch >= cfg.min_epochs
            bar.update(1)
            bar.set_postfix(loss=f"{total / max(steps, 1):.3f}", ndcg10=f"{metrics['ndcg@10']:.4f}")
            if job.checkpoint_path is not None:
                save_checkpoint(job.checkpoint_path, _checkpoint(job, full, state, summary, world))
            decision = [state["finished"]]
        dist.broadcast_object_list(decision, src=0)
        state["epoch"], state["finished"] = epoch, decision[0]
    bar.close()
    if rank != 0:
        return None
    eval_model.load_state_dict(state["best_state"])
    eval_model.eval()
    best = next((h for h in state["history"] if h["epoch"] == state["best_epoch"]), {})
    result = TrainResult(
        model=eval_model,
        config=cfg,
        best_epoch=state["best_epoch"],
        best_valid={k.removeprefix("valid_"): v for k, v in best.items() if k.startswith("valid_")},
        history=state["history"],
        seconds=time.perf_counter() - t0,
        checkpoint_path=job.checkpoint_path,
    )
    return DistributedTrainResult(result=result, plan=summary, step_losses=step_losses)


def _checkpoint(
    job: _Job,
    full: dict[str, torch.Tensor],
    state: dict[str, Any],
    plan: dict[str, str],
    world: int,
) -> dict[str, Any]:
    """The single-process checkpoint dict, without optimizer state (not resumable)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model_config": job.cfg.model.to_dict(),
        "train_config": job.cfg.to_dict(),
        "dataset": job.dataset,
        "item_ids": job.item_ids,
        "versions": library_versions(),
        "model_state": full,
        "optimizer_state": None,
        "distributed": {"world_size": world, "backend": job.dcfg.backend, "plan": plan},
        **state,
    }


def _spawned(rank: int, job: _Job, port: int) -> None:
    """Entry point of a process started by :func:`train_distributed`."""
    os.environ["MASTER_ADDR"] = job.dcfg.master_addr
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(job.dcfg.backend, rank=rank, world_size=job.dcfg.world_size)
    try:
        out = _run_rank(rank, job)
        if out is not None and job.result_path is not None:
            torch.save(
                {
                    "history": out.result.history,
                    "best_epoch": out.result.best_epoch,
                    "best_valid": out.result.best_valid,
                    "best_state": out.result.model.state_dict(),
                    "plan": out.plan,
                    "step_losses": out.step_losses,
                },
                job.result_path,
            )
    finally:
        dist.destroy_process_group()


def launched_externally() -> bool:
    """True inside a ``torchrun`` (or any launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def train_distributed(
    cfg: TrainConfig,
    dataset: Dataset,
    dcfg: DistributedConfig,
    *,
    rows: np.ndarray | None = None,
    valid: EvalSet | None = None,
    checkpoint_path: str | Path | None = None,
    progress: bool = True,
) -> DistributedTrainResult | None:
    """Train like :func:`device_ranker.train.train`, sharded over ``dcfg.world_size`` processes.

    Spawns the processes (loopback, a free port), unless this process was started by
    ``torchrun`` (then it is one rank of that group and ranks other than 0 return None).

    Args:
        cfg, dataset, rows, valid, checkpoint_path, progress: as for ``train``.
        dcfg: :class:`DistributedConfig`.

    Returns:
        :class:`DistributedTrainResult` (best model, plan, per-step losses) on rank 0.
    """
    t0 = time.perf_counter()
    cfg, windows, valid = training_data(cfg, dataset, rows, valid)
    check_config(cfg, dcfg)
    job = _Job(
        cfg=cfg,
        dcfg=dcfg,
        windows=windows,
        valid=valid,
        dataset=dataset_info(dataset),
        item_ids=[str(i) for i in dataset.item_ids],
        checkpoint_path=Path(checkpoint_path) if checkpoint_path else None,
        result_path=None,
        progress=progress,
    )
    if launched_externally():
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        if world != dcfg.world_size:
            raise ValidationError(f"world size {dcfg.world_size} != launcher's WORLD_SIZE {world}")
        dist.init_process_group(dcfg.backend)
        try:
            return _run_rank(rank, job)
        finally:
            dist.destroy_process_group()
    import torch.multiprocessing as mp

    port = dcfg.master_port or _free_port()
    with tempfile.TemporaryDirectory(prefix="ranker-dmp-") as tmp:
        job.result_path = Path(tmp) / "result.pt"
        mp.spawn(_spawned, args=(job, port), nprocs=dcfg.world_size, join=True)
        out = torch.load(job.result_path, weights_only=False)
    model = SeqRanker(cfg.model)
    model.load_state_dict(out["best_state"])
    result = TrainResult(
        model=model.eval(),
        config=cfg,
        best_epoch=out["best_epoch"],
        best_valid=out["best_valid"],
        history=out["history"],
        seconds=time.perf_counter() - t0,
        checkpoint_path=job.checkpoint_path,
    )
    return DistributedTrainResult(result=result, plan=out["plan"], step_losses=out["step_losses"])
