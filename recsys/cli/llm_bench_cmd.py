"""``recsys bench llm``: the codebook LM as a generative retriever, and its backends' speed.

recsys bench llm --dataset ml-100k [--backends transformers,vllm] [--json PATH]

(a) Quality: leave-one-out by time, top-N IDs by constrained beam search beside the
most-popular baseline and TIGER's published figures; (b) throughput: the same model and
histories through each backend (start-up, users/s, latency, top-1 agreement).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from recsys.cli.common import (
    add_command,
    add_dataset_option,
    add_json_option,
    add_location_options,
    add_threads_option,
)
from recsys.errors import ValidationError
from recsys.reporting import dataset_record, print_table, write_json

logger = logging.getLogger(__name__)

BENCH_BACKENDS = ("transformers", "transformers-hf", "vllm", "openai")
TIGER_FMT = {"recall@10": "0.0648", "ndcg@10": "0.0384"}  # as printed in the quality table


def register(groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``llm`` to the ``bench`` group."""
    p = add_command(
        groups["bench"],
        "llm",
        cmd_bench,
        help="codebook LM as a generative retriever (Recall/NDCG vs most-popular) and backend throughput",
        description="(a) Leave-one-out by time: top-N IDs by constrained beam search -> Recall@5/10 "
        "and NDCG@5/10, beside the most-popular baseline and TIGER's published Amazon Beauty "
        "figures; (b) the same model and histories through each backend: start-up, users/s, "
        "p50/p99 latency per call, top-1 agreement with transformers. Trains the LOO model "
        "first if it is missing.",
    )
    add_dataset_option(p)
    p.add_argument(
        "--model", help="LOO-trained model directory (default CACHE_DIR/artifacts/NAME/lm-loo)"
    )
    p.add_argument("--codebook", help="codebook directory, if the model directory has none")
    p.add_argument(
        "--backends",
        default="transformers,vllm",
        help=f"comma list of {', '.join(BENCH_BACKENDS)} for the throughput table (default transformers,vllm); "
        "openai starts its own server unless --openai-url is given",
    )
    p.add_argument("--top-n", type=int, default=10, help="items generated per user (default 10)")
    p.add_argument("--beam", type=int, default=20, help="beam width (default 20)")
    p.add_argument(
        "--keep-seen",
        action="store_true",
        help="quality: also allow already-seen items (default: excluded, like the baselines)",
    )
    p.add_argument(
        "--throughput-users", type=int, default=256, help="users timed per backend (default 256)"
    )
    p.add_argument(
        "--batch-users",
        type=int,
        default=64,
        help="users per generate call in the throughput runs (default 64)",
    )
    p.add_argument(
        "--latency-users", type=int, default=32, help="users timed one per call (default 32)"
    )
    p.add_argument(
        "--vllm-dtype",
        default="bfloat16",
        choices=("bfloat16", "float32"),
        help="vLLM engine dtype (default bfloat16)",
    )
    p.add_argument("--vllm-python", help="interpreter with vLLM (default .venv-vllm/bin/python)")
    p.add_argument(
        "--openai-url",
        help="use this running server for the openai backend instead of starting one",
    )
    add_threads_option(p, help="torch threads of the in-process backend")
    add_location_options(p)
    add_json_option(p)


def cmd_bench(args: argparse.Namespace) -> int:
    from llm_cloud import bench
    from recsys.data.registry import load_dataset

    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCH_BACKENDS]
    if unknown:
        raise ValidationError(
            f"unknown backend(s) {unknown}; choose from {', '.join(BENCH_BACKENDS)}"
        )
    if args.beam < args.top_n:
        raise ValidationError(f"--beam {args.beam} must be >= --top-n {args.top_n}")
    start = time.perf_counter()
    ds = load_dataset(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir)
    model, meta, train_info = _loo_model(args, ds)
    evaluation = bench.loo_histories(ds)
    quality, max_history = _quality(args, ds, model, evaluation)
    throughput = _throughput(args, names, model, evaluation)
    print(f"\nbench {time.perf_counter() - start:.0f} s")
    write_json(
        args.json,
        {
            "dataset": dataset_record(ds, sizes=True),
            "protocol": "leave-one-out by time; last event = test; history = all earlier events "
            f"truncated to the {max_history} most recent; top-{args.top_n} by constrained beam search",
            "model_dir": str(model),
            "model_meta": {k: v for k, v in meta.items() if k != "history"},
            "train_history": meta.get("history"),
            "seed": meta.get("config", {}).get("seed"),
            "bench_config": {
                k: v for k, v in vars(args).items() if k not in ("handler", "_group_parser")
            },
            "quality": quality,
            "throughput": throughput,
            **train_info,
        },
    )
    return 0


def _loo_model(args: argparse.Namespace, ds: Any) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(model directory, its meta, training info): the leave-one-out LM, trained now when
    the default one is missing."""
    from codebook.train import codebook_dir
    from llm_cloud.artifact import lm_dir, read_meta
    from llm_cloud.lm_config import LMConfig
    from recsys.cli.llm_cmd import train_and_save

    model = Path(args.model).expanduser() if args.model else lm_dir(ds.name, args.cache_dir, "loo")
    train_info: dict[str, Any] = {}
    if not (model / "config.json").is_file():
        if args.model:
            raise ValidationError(
                f"{model} holds no model; train one with `recsys train lm --split loo`"
            )
        print(f"no leave-one-out LM at {model}; training one (`recsys train lm --split loo`)")
        cfg = LMConfig(threads=args.threads) if args.threads else LMConfig()
        codebook = args.codebook or codebook_dir(ds.name, args.cache_dir)
        result, _ = train_and_save(ds, "loo", codebook, model, cfg, progress=True)
        train_info = {"trained_now": True, "train_seconds": result.seconds}
    meta = read_meta(model)
    if meta.get("dataset_fingerprint") not in (None, ds.fingerprint()):
        raise ValidationError(f"{model} was trained on another version of {ds.name}; retrain it")
    split = meta.get("split")
    if meta and (split.get("split") if isinstance(split, dict) else split) != "loo":
        print(
            f"warning: {model} was not trained on the leave-one-out split; test targets may have been seen"
        )
    return model, meta, train_info


def _quality(
    args: argparse.Namespace, ds: Any, model: Path, evaluation: Any
) -> tuple[dict[str, Any], int]:
    """(a): every test user's top-N against the most-popular baseline; (figures, H)."""
    from llm_cloud import bench
    from llm_cloud.backends import BackendConfig, make_backend

    exclude = not args.keep_seen
    quality_cfg = BackendConfig(
        codebook_dir=args.codebook,
        beam_width=args.beam,
        exclude_history=exclude,
        batch_users=args.batch_users,
    )
    with make_backend("transformers", model, quality_cfg, threads=args.threads) as backend:
        t0 = time.perf_counter()
        ranked = backend.generate(evaluation.histories, args.top_n)
        quality_seconds = time.perf_counter() - t0
        max_history = backend.vocab.max_history
    lm_metrics = bench.quality_metrics(ranked, evaluation.targets)
    pop_unseen = bench.popularity_metrics(ds, evaluation, exclude_seen=True)
    pop_all = bench.popularity_metrics(ds, evaluation, exclude_seen=False)
    seen_note = "excludes seen" if exclude else "may repeat seen"
    quality = [
        {"model": f"codebook LM, beam {args.beam} (ours)", **_fmt(lm_metrics), "note": seen_note},
        {"model": "most-popular (ours)", **_fmt(pop_unseen), "note": "excludes seen"},
        {"model": "most-popular (ours)", **_fmt(pop_all), "note": "may repeat seen"},
        {
            "model": "TIGER (published)",
            "recall@5": "-", "ndcg@5": "-",
            "recall@10": TIGER_FMT["recall@10"], "ndcg@10": TIGER_FMT["ndcg@10"],
            "note": "Amazon Beauty, anchor only",
        },
    ]  # fmt: skip
    gain = (
        lm_metrics["recall@10"] / pop_unseen["recall@10"]
        if pop_unseen["recall@10"]
        else float("nan")
    )
    print(
        f"\n{ds.name}: {len(evaluation.users)} test users; leave-one-out by time (last event test), "
        f"history <= {max_history} most recent items, top-{args.top_n} of constrained beam search"
    )
    print_table(quality, title="Generative retrieval quality (leave-one-out test targets)")
    print(
        f"\ncodebook LM Recall@10 = {gain:.2f}x most-popular (excl. seen); {quality_seconds:.1f} s for all users"
    )
    figures = {
        "codebook_lm": lm_metrics,
        "codebook_lm_excludes_seen": exclude,
        "most_popular_excl_seen": pop_unseen,
        "most_popular_incl_seen": pop_all,
        "tiger_published_amazon_beauty": bench.TIGER_BEAUTY,
        "recall10_ratio_vs_most_popular": gain,
        "seconds": quality_seconds,
        "test_users": len(evaluation.users),
    }
    return figures, max_history


def _throughput(
    args: argparse.Namespace, names: list[str], model: Path, evaluation: Any
) -> dict[str, Any]:
    """(b): the same histories through every backend in ``names``; figures per backend."""
    import torch

    from llm_cloud import bench

    histories = evaluation.histories[: args.throughput_users]
    singles = evaluation.histories[: args.latency_users]
    rows: list[dict[str, Any]] = []
    figures: dict[str, Any] = {}
    reference: list[Any] | None = None
    for name in names:
        print(f"\n[{name}] starting ...", flush=True)
        t0 = time.perf_counter()
        backend, server = _make_bench_backend(name, model, args, args.beam)
        startup = time.perf_counter() - t0
        try:
            backend.generate(histories[:2], args.top_n)  # warm-up
            results, seconds = bench.timed_batches(
                backend.generate, histories, args.batch_users, args.top_n
            )
            _, single_seconds = bench.timed_batches(backend.generate, singles, 1, args.top_n)
            info = backend.info()
        finally:
            backend.close()
            if server is not None:
                server.stop()
        batched = bench.latency_summary(seconds, len(histories))
        single = bench.latency_summary(single_seconds, len(singles))
        if reference is None and name == "transformers":
            reference = results
        agree = bench.top1_agreement(results, reference) if reference is not None else float("nan")
        figures[name] = {
            "startup_s": startup,
            "batched": batched,
            "single": single,
            "top1_agreement_with_transformers": agree,
            "info": info,
            "quality_on_subset": bench.quality_metrics(
                results, evaluation.targets[: len(histories)]
            ),
        }
        rows.append(
            {
                "backend": name,
                "startup_s": f"{startup:.1f}",
                f"users/s (batch {args.batch_users})": f"{batched['users_per_s']:.1f}",
                "p50 ms/call": f"{batched['p50_ms']:.0f}",
                "p99 ms/call": f"{batched['p99_ms']:.0f}",
                "1-user p50 ms": f"{single['p50_ms']:.1f}",
                "1-user p99 ms": f"{single['p99_ms']:.1f}",
                "top-1 = transformers": f"{agree:.3f}" if agree == agree else "-",
            }
        )
    print_table(
        rows,
        title=f"Throughput: {len(histories)} users in calls of {args.batch_users} (+ {len(singles)} "
        f"single-user calls), beam {args.beam}, top-{args.top_n}, same model, all history kept "
        f"(no exclusion), torch threads {torch.get_num_threads()}",
    )
    return figures


def _make_bench_backend(
    name: str, model: Path, args: argparse.Namespace, beam: int
) -> tuple[Any, Any]:
    """(backend, server or None) for a throughput run."""
    from llm_cloud.backends import BackendConfig, make_backend

    cfg = BackendConfig(codebook_dir=args.codebook, beam_width=beam, batch_users=args.batch_users)
    if name == "transformers":
        return make_backend("transformers", model, cfg, threads=args.threads), None
    if name == "transformers-hf":
        return make_backend("transformers", model, cfg, search="hf", threads=args.threads), None
    if name == "vllm":
        return make_backend(
            "vllm", model, cfg, dtype=args.vllm_dtype, python=args.vllm_python
        ), None
    if name == "openai":
        if args.openai_url:
            return make_backend("openai", model, cfg, url=args.openai_url), None
        from llm_cloud.artifact import load_item_vocab
        from llm_cloud.server import ServerConfig, VllmServer
        from llm_cloud.vllm_env import context_length

        vocab, _ = load_item_vocab(model, args.codebook)
        server = VllmServer(
            ServerConfig(model_dir=model, dtype=args.vllm_dtype, python=args.vllm_python,
                         max_model_len=context_length(vocab))
        )  # fmt: skip
        server.start()
        try:
            return make_backend("openai", model, cfg, url=server.url), server
        except BaseException:
            server.stop()
            raise
    raise ValidationError(f"unknown backend {name!r}; choose from {', '.join(BENCH_BACKENDS)}")


def _fmt(metrics: dict[str, float]) -> dict[str, float]:
    return {k: metrics[k] for k in ("recall@5", "ndcg@5", "recall@10", "ndcg@10")}
