"""``recsys serve llm``: the codebook LM behind vLLM's OpenAI-compatible server.

recsys serve llm --model DIR [--port N] [--dtype bfloat16|float32] [--vllm-arg=ARG ...]

Constrained to valid item IDs by the trie logits processor; runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from recsys.cli.common import add_command, add_dataset_option, add_location_options

logger = logging.getLogger(__name__)


def register(groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``llm`` to the ``serve`` group."""
    p = add_command(
        groups["serve"],
        "llm",
        cmd_serve,
        help="serve the codebook LM with vLLM's OpenAI-compatible server (valid IDs only)",
        description="Start `python -m vllm.entrypoints.openai.api_server` from the vLLM "
        "environment (.venv-vllm, see scripts/install_vllm.sh) on 127.0.0.1 with the trie "
        "logits processor and processed log-probs, wait for /health, print how to query it, "
        "and run until SIGINT/SIGTERM (then stop the server and its engine processes).",
    )
    p.add_argument(
        "--model", help="model directory (default CACHE_DIR/artifacts/NAME/lm of --dataset)"
    )
    add_dataset_option(p, help="dataset whose default model to serve (default ml-100k)")
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
        "--vllm-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for vLLM's server, repeatable, written with '=': e.g. "
        "--vllm-arg=--tensor-parallel-size=2 --vllm-arg=--distributed-executor-backend=ray "
        "on a multi-GPU or multi-node deployment",
    )
    p.add_argument(
        "--startup-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for /health (default 600)",
    )
    add_location_options(p)


def server_config(args: argparse.Namespace, model: Path, max_model_len: int):
    """The :class:`llm_cloud.server.ServerConfig` of ``recsys serve llm``'s options."""
    from llm_cloud.server import ServerConfig

    return ServerConfig(
        model_dir=model,
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        dtype=args.dtype,
        max_model_len=max_model_len,
        max_logprobs=args.max_logprobs,
        python=args.vllm_python,
        log_path=args.log,
        startup_timeout=args.startup_timeout,
        extra_args=list(args.vllm_arg),
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from llm_cloud.artifact import ensure_trie_file, lm_dir, load_item_vocab
    from llm_cloud.server import VllmServer
    from llm_cloud.vllm_env import context_length

    model = Path(args.model).expanduser() if args.model else lm_dir(args.dataset, args.cache_dir)
    vocab, _ = load_item_vocab(model)
    trie = ensure_trie_file(vocab, model)
    server = VllmServer(server_config(args, model, context_length(vocab)))
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
