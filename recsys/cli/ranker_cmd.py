"""``recsys train ranker`` and ``recsys bench ranker``: the device ranker.

recsys train ranker [--dataset ml-100k] [--out PATH] [--resume] [--epochs N] [--seed S] ...
recsys train ranker --world-size 2 [--sharding auto|table_wise|row_wise|column_wise]
    --embedding-optimizer adagrad --embedding-lr 0.05      (TorchRec DMP, gloo on CPU)
recsys bench ranker [--dataset ml-100k] [--checkpoint PATH] [--retrain] [--json PATH]
recsys bench ann [--dataset ml-100k] [--sizes 10000,100000,1000000] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

from recsys.cli.common import (
    add_command,
    add_dataset_option,
    add_json_option,
    add_location_options,
    add_max_minutes_option,
    add_progress_option,
    add_seed_option,
    add_threads_option,
    given,
)
from recsys.reporting import dataset_record, print_table, write_json

logger = logging.getLogger(__name__)


def register(groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``ranker`` to the ``train`` and ``bench`` groups."""
    p = add_command(
        groups["train"],
        "ranker",
        cmd_train,
        help="train the device ranker (TorchRec embeddings + SASRec encoder + editable head)",
        description="Train the device ranker on the leave-one-out training rows of a dataset, "
        "early-stopping on the validation targets (each user's second-to-last event). Writes "
        "a checkpoint after every epoch (default CACHE_DIR/artifacts/NAME/ranker.pt).",
    )
    _add_common(p)
    _add_train_options(p)
    _add_distributed_options(p)
    add_json_option(p)

    p = add_command(
        groups["bench"],
        "ranker",
        cmd_bench,
        help="quality (HR/NDCG/MRR) and cost (latency, edit, fine-tune) of the device ranker",
        description="Leave-one-out-by-time full-catalogue evaluation (already-seen items "
        "excluded) of the trained ranker and a popularity baseline next to quoted RecBole "
        "figures, plus single-user / batched latency, edit application time and on-device "
        "fine-tuning cost. Trains first if the checkpoint is missing.",
    )
    _add_common(p)
    _add_train_options(p)
    p.add_argument(
        "--retrain", action="store_true", help="train again even if the checkpoint exists"
    )
    p.add_argument(
        "--latency-users", type=int, default=300, help="users timed one by one (default 300)"
    )
    p.add_argument(
        "--batch-size", type=int, default=256, help="users per batched call (default 256)"
    )
    p.add_argument(
        "--finetune-users", type=int, default=20, help="users fine-tuned for the cost (default 20)"
    )
    add_json_option(p)

    p = add_command(
        groups["bench"],
        "ann",
        cmd_bench_ann,
        help="recall@10 and latency of the faiss pre-selection (IVF, HNSW) vs exact ranking",
        description="Large-catalogue ranking: synthetic catalogues of N items built around "
        "the trained ranker's item table (real items first, then Gaussian items with a "
        "popularity-skewed bias), queried with the ranker's queries for the test users "
        "(their histories excluded as seen). Exact full scoring vs faiss IVF-Flat and "
        "HNSW-Flat pre-selection + exact scores of the candidates: recall@10 against exact "
        "on held-out users (the search parameter chosen on the other half), latency per "
        "user and per batch, index build time and size. Needs a trained ranker; --threads "
        "sets torch and faiss threads.",
    )
    _add_common(p)
    p.add_argument(
        "--sizes",
        "--catalogue",
        dest="sizes",
        default="10000,100000,1000000",
        help="catalogue sizes N, comma-separated (default 10000,100000,1000000)",
    )
    p.add_argument(
        "--latency-users", type=int, default=200, help="single-user calls timed (default 200)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="users per batched call (default 64)")
    p.add_argument(
        "--target-recall",
        type=float,
        default=0.99,
        help="recall@10 the tuning half must reach; the smallest nprobe / efSearch that does "
        "is reported (default 0.99)",
    )
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW graph degree M (default 32)")
    p.add_argument("--ef-construction", type=int, default=40, help="HNSW build beam (default 40)")
    p.add_argument("--nlist", type=int, default=0, help="IVF lists (default 0 = sqrt(N))")
    add_seed_option(p, help="seed of the catalogue and the user split (default 0)")
    add_json_option(p)


def _add_common(p: argparse.ArgumentParser) -> None:
    add_dataset_option(p)
    p.add_argument(
        "--checkpoint",
        "--out",
        dest="checkpoint",
        help="checkpoint path (default CACHE_DIR/artifacts/NAME/ranker.pt)",
    )
    add_threads_option(p)
    add_location_options(p)


def _add_train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (defaults: device_ranker.train.TrainConfig)")
    g.add_argument("--epochs", type=int, help="maximum epochs (early stopping usually ends sooner)")
    g.add_argument(
        "--patience", type=int, help="epochs without a better valid NDCG@10 before stopping"
    )
    add_seed_option(g, help="seed for init, shuffling, dropout (default 0)")
    g.add_argument(
        "--loss", choices=("ce", "bce"), help="full-softmax cross-entropy or sampled BCE"
    )
    g.add_argument("--encoder", choices=("sasrec", "attn_pool"), help="sequence encoder")
    g.add_argument("--dim", type=int, help="embedding / model width D")
    g.add_argument("--max-len", type=int, help="history events read by the encoder T")
    g.add_argument("--lr", type=float, help="AdamW learning rate")
    g.add_argument("--dropout", type=float, help="dropout in training (default 0.2)")
    g.add_argument(
        "--embedding-optimizer",
        choices=("adamw", "adagrad", "sgd"),
        help="optimizer of the embedding tables (default adamw, with the rest; sharded "
        "tables on CPU need adagrad or sgd)",
    )
    g.add_argument(
        "--embedding-lr", type=float, help="learning rate of adagrad/sgd tables (default --lr)"
    )
    add_max_minutes_option(g)
    g.add_argument(
        "--resume", action="store_true", help="continue from the checkpoint (same config)"
    )
    add_progress_option(g)


def _add_distributed_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "sharded training (TorchRec DistributedModelParallel; device_ranker.distributed_train)"
    )
    g.add_argument(
        "--world-size",
        type=int,
        default=1,
        help="processes to shard the embedding tables over (default 1: single process); "
        "under torchrun, the launcher's WORLD_SIZE",
    )
    g.add_argument(
        "--sharding",
        choices=("auto", "table_wise", "row_wise", "column_wise", "data_parallel"),
        default="auto",
        help="TorchRec sharding type of every table (default auto: the planner's choice; "
        "data_parallel fails on CPU)",
    )
    g.add_argument(
        "--backend",
        choices=("gloo", "nccl"),
        default="gloo",
        help="torch.distributed backend (gloo: CPU; nccl: one GPU per process, untested here)",
    )


def _train_config(args: argparse.Namespace):
    from dataclasses import replace

    from device_ranker.config import ModelConfig
    from device_ranker.train import TrainConfig

    model_kw = given(
        args, {"encoder": "encoder", "dim": "dim", "max_len": "max_len", "dropout": "dropout"}
    )
    train_kw = given(
        args,
        {
            k: k
            for k in (
                "epochs",
                "patience",
                "loss",
                "lr",
                "seed",
                "max_minutes",
                "embedding_optimizer",
                "embedding_lr",
            )
        },
    )
    return replace(TrainConfig(), model=ModelConfig(num_items=0, **model_kw), **train_kw)


def _setup(args: argparse.Namespace):
    import torch

    from recsys import settings
    from recsys.data.registry import load_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    ds = load_dataset(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir)
    ckpt = (
        Path(args.checkpoint)
        if args.checkpoint
        else (settings.cache_dir(args.cache_dir) / "artifacts" / ds.name / "ranker.pt")
    )
    return ds, ckpt


def _train_sharded(args: argparse.Namespace, ds, ckpt: Path):
    """(result, {"config", "plan"}) of a DMP run; (None, None) on a torchrun rank other than 0."""
    from dataclasses import asdict

    from device_ranker.distributed_train import (
        DistributedConfig,
        check_config,
        train_distributed,
    )
    from recsys.errors import ValidationError

    if args.resume:
        raise ValidationError("--resume is not supported with --world-size > 1")
    cfg = _train_config(args)
    dcfg = DistributedConfig(
        world_size=args.world_size,
        sharding=args.sharding,
        backend=args.backend,
        threads=args.threads or 1,
    )
    check_config(cfg, dcfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"training ranker on {ds.name} ({ds.num_users:,} users, {ds.num_items:,} items) "
            f"on {args.world_size} processes -> {ckpt}"
        )
    out = train_distributed(cfg, ds, dcfg, checkpoint_path=ckpt, progress=not args.no_progress)
    if out is None:
        return None, None
    for table, how in out.plan.items():
        print(f"sharding plan: {table}: {how}")
    result = out.result
    print(
        f"best epoch {result.best_epoch} of {len(result.history)}, valid NDCG@10 "
        f"{result.best_valid.get('ndcg@10', float('nan')):.4f}, {result.seconds:.0f} s"
    )
    return result, {"config": asdict(dcfg), "plan": out.plan}


def _train(args: argparse.Namespace, ds, ckpt: Path, resume: bool):
    from device_ranker.train import train

    cfg = _train_config(args)
    print(
        f"training ranker on {ds.name} ({ds.num_users:,} users, {ds.num_items:,} items) -> {ckpt}"
    )
    result = train(cfg, ds, checkpoint_path=ckpt, resume=resume, progress=not args.no_progress)
    print(
        f"best epoch {result.best_epoch} of {len(result.history)}, valid NDCG@10 "
        f"{result.best_valid.get('ndcg@10', float('nan')):.4f}, {result.seconds:.0f} s"
    )
    return result


def cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from device_ranker.distributed_train import launched_externally

    ds, ckpt = _setup(args)
    distributed = None
    if args.world_size > 1 or launched_externally():
        result, distributed = _train_sharded(args, ds, ckpt)
        if result is None:  # a torchrun rank other than 0
            return 0
    else:
        result = _train(args, ds, ckpt, args.resume)
    print_table(
        [
            {
                "epoch": h["epoch"],
                "loss": h["loss"],
                "valid ndcg@10": h["valid_ndcg@10"],
                "valid hr@10": h["valid_hr@10"],
                "s": h["seconds"],
            }
            for h in result.history[-5:]
        ],
        title="last epochs",
    )
    write_json(
        args.json,
        {
            "dataset": dataset_record(ds),
            "config": asdict(result.config),
            "seed": result.config.seed,
            "best_epoch": result.best_epoch,
            "best_valid": result.best_valid,
            "history": result.history,
            "seconds": result.seconds,
            "checkpoint": _portable(ckpt, args),
            **({"distributed": distributed} if distributed else {}),
        },
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from device_ranker.bench import BenchConfig, cost_rows, metric_rows, run_bench
    from device_ranker.ranker import Ranker
    from device_ranker.train import load_checkpoint

    ds, ckpt = _setup(args)
    train_info: dict[str, Any] = {}
    stale = ckpt.is_file() and load_checkpoint(ckpt)["dataset"]["fingerprint"] != ds.fingerprint()
    if args.retrain or not ckpt.is_file() or stale:
        if stale:
            print(f"{ckpt} was trained on another version of {ds.name}; retraining")
        result = _train(args, ds, ckpt, resume=False)
        train_info = {
            "train_seconds": result.seconds,
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
        }
    else:
        c = load_checkpoint(ckpt)
        if not c.get("finished") and c["epoch"] < c["train_config"]["epochs"]:
            print(
                f"note: {ckpt} is from an unfinished run (epoch {c['epoch']}); use --retrain or "
                "`recsys train ranker --resume`"
            )
        train_info = {"best_epoch": c["best_epoch"], "epochs_run": c["epoch"]}
    ckpt_dict = load_checkpoint(ckpt)
    ranker = Ranker.from_checkpoint(ckpt)
    cfg = BenchConfig(
        latency_users=args.latency_users,
        batch_size=args.batch_size,
        finetune_users=args.finetune_users,
        seed=args.seed,
    )
    t0 = time.perf_counter()
    figures = run_bench(cfg, ds, ranker)
    print(f"\n{ds.name}: {figures['test_users']} test users; protocol: {figures['protocol']}")
    print_table(
        metric_rows(figures), title="Full-catalogue ranking on the leave-one-out test targets"
    )
    print_table(
        cost_rows(figures),
        title=f"Cost (in process, CPU, {figures['torch_threads']} torch thread(s))",
    )
    print(
        f"\nexport parity max |diff| {figures['export_max_abs_diff']:.2e}; edit revert bit-exact: "
        f"{figures['edit_revert_exact']}; edit size {figures['edit_bytes_fp32']} B fp32 / "
        f"{figures['edit_bytes_fp16']} B fp16 (bench {time.perf_counter() - t0:.0f} s)"
    )
    write_json(
        args.json,
        {
            **figures,
            "dataset": dataset_record(ds, sizes=True),
            "config": {"model": ckpt_dict["model_config"], "train": ckpt_dict["train_config"]},
            "seed": ckpt_dict["train_config"]["seed"],
            "checkpoint": str(ckpt),
            **train_info,
        },
    )
    return 0


def cmd_bench_ann(args: argparse.Namespace) -> int:
    import faiss
    import torch

    from device_ranker.ann_bench import AnnBenchConfig, run_ann_bench
    from device_ranker.config import AnnConfig
    from device_ranker.evaluate import loo_eval_set
    from device_ranker.ranker import Ranker
    from recsys.data import leave_one_out

    ds, ckpt = _setup(args)
    faiss.omp_set_num_threads(args.threads or torch.get_num_threads())
    if not ckpt.is_file():
        from recsys.errors import NotFoundError

        raise NotFoundError(f"no ranker checkpoint at {ckpt}; run `recsys train ranker` first")
    ranker = Ranker.from_checkpoint(ckpt)
    test = loo_eval_set(ds, leave_one_out(ds), "test")
    cfg = AnnBenchConfig(
        sizes=tuple(int(s) for s in args.sizes.split(",")),
        batch=args.batch_size,
        latency_users=args.latency_users,
        target_recall=args.target_recall,
        ivf=AnnConfig(mode="on", kind="ivf", nlist=args.nlist, seed=args.seed or 0),
        hnsw=AnnConfig(
            mode="on", kind="hnsw", hnsw_m=args.hnsw_m, ef_construction=args.ef_construction
        ),
        seed=args.seed or 0,
    )
    t0 = time.perf_counter()

    def show(rows: list[dict[str, Any]]) -> None:
        print_table(rows, title=f"N = {rows[0]['items']:,} items")

    figures = run_ann_bench(cfg, ranker, test.histories, progress=show)
    print(
        f"\n{ds.name}: {figures['users']['tuning']} tuning / {figures['users']['held_out']} "
        f"held-out users (seen items excluded), D={ranker.model.cfg.dim}, top-{cfg.k}, "
        f"{figures['torch_threads']} torch / {faiss.omp_get_max_threads()} faiss thread(s)"
    )
    print_table(figures["rows"], title="Exact vs faiss pre-selection + exact scores")
    print(f"(bench {time.perf_counter() - t0:.0f} s)")
    write_json(
        args.json,
        {
            **figures,
            "dataset": dataset_record(ds),
            "checkpoint": _portable(ckpt, args),
            "faiss": faiss.__version__,
            "seed": cfg.seed,
        },
    )
    return 0


def _portable(path: Path, args: argparse.Namespace) -> str:
    """``path`` as ``CACHE_DIR/...`` when under the cache directory (no machine paths in
    committed results), else as given."""
    from recsys import settings

    try:
        return "CACHE_DIR/" + str(
            path.resolve().relative_to(settings.cache_dir(args.cache_dir).resolve())
        )
    except ValueError:
        return str(path)
