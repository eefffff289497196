"""A ``vllm.LLM`` engine behind a JSON-lines pipe: the process of the ``vllm`` backend.

Runs in the vLLM environment (``.venv-vllm/bin/python -m llm_cloud.vllm_worker ...``,
project root on ``PYTHONPATH``); imports only vllm and the standard library (plus the
trie logits processor, which the engine loads by name). The main environment's
:class:`llm_cloud.backends.vllm_worker_backend.VllmBackend` starts it and talks to it:

* The protocol runs over the process's original stdout, one JSON object per line;
  file descriptor 1 is then pointed at stderr, so vLLM's own prints (and its engine
  processes, which inherit fd 1) can never corrupt the protocol.
* First line written: ``{"ok": true, "event": "ready", "startup_s": ..., "vllm": ...}``
  once the engine is built (or ``{"ok": false, "error": ...}`` and exit 1).
* Requests on stdin, one response line each:

  - ``{"op": "step", "prompts": [[token ids], ...], "logprobs": k}`` -> ``{"ok": true,
    "top": [[[token, logprob], ...], ...], "engine_s": ..., "prompt_tokens": ...,
    "cached_tokens": ...}``: one greedy token per prompt under the trie constraint, the
    top-k *processed* log-probs (masked tokens left out); plus the seconds spent inside
    ``llm.generate`` and the prompt tokens of the call, of which ``cached_tokens`` were
    prefix-cache hits (the rest were computed: the profile of ``recsys bench llm``).
  - ``{"op": "info"}`` -> engine settings.
  - ``{"op": "shutdown"}`` -> ``{"ok": true}``, then the engine is shut down and the
    process exits 0 (EOF on stdin does the same).

The ``if __name__ == "__main__"`` guard is required: vLLM starts its engine core with
``spawn``, which re-imports the main module.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, TextIO

LOGITS_PROCESSOR = "llm_cloud.vllm_trie_lp:ItemTrieLogitsProcessor"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="vLLM engine behind a JSON-lines pipe")
    p.add_argument("--model", required=True, help="model directory (HF format)")
    p.add_argument("--trie", required=True, help="trie JSON file of valid IDs (token-id lists)")
    p.add_argument("--sep", type=int, required=True, help="<sep> token id")
    p.add_argument("--eos", type=int, default=None, help="token allowed after a complete ID")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (fast on CPU) or float32")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--max-logprobs", type=int, default=64, help=">= the beam width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--block-size",
        type=int,
        default=32,
        help="KV-cache block (tokens); the CPU default 128 is longer than our prompts, so "
        "prefix caching of the user prompt across beams never hits",
    )
    return p.parse_args(argv)


def _send(out: TextIO, payload: dict[str, Any]) -> None:
    out.write(json.dumps(payload, separators=(",", ":")) + "\n")
    out.flush()


def serve(args: argparse.Namespace, requests: TextIO, out: TextIO) -> int:
    start = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        enforce_eager=True,
        max_model_len=args.max_model_len,
        seed=args.seed,  # engine-wide only: per-request seeds crash the CPU runner
        logits_processors=[LOGITS_PROCESSOR],
        logprobs_mode="processed_logprobs",
        max_logprobs=args.max_logprobs,
        block_size=args.block_size,
    )
    extra: dict[str, Any] = {"item_trie": os.path.abspath(args.trie), "item_sep": args.sep}
    if args.eos is not None:
        extra["item_eos"] = args.eos
    info = {
        "vllm": vllm.__version__,
        "model": args.model,
        "dtype": args.dtype,
        "max_model_len": args.max_model_len,
        "max_logprobs": args.max_logprobs,
        "block_size": args.block_size,
        "pid": os.getpid(),
    }
    _send(out, {"ok": True, "event": "ready", "startup_s": time.perf_counter() - start, **info})
    for line in requests:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            op = req.get("op")
            if op == "shutdown":
                _send(out, {"ok": True})
                break
            if op == "info":
                _send(out, {"ok": True, **info})
            elif op == "step":
                k = int(req["logprobs"])
                params = SamplingParams(
                    max_tokens=1, temperature=0.0, logprobs=k, detokenize=False, extra_args=extra
                )
                prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in req["prompts"]]
                t0 = time.perf_counter()
                outs = llm.generate(prompts, params, use_tqdm=False)
                engine_s = time.perf_counter() - t0
                top = [
                    [
                        [int(t), float(lp.logprob)]
                        for t, lp in (o.outputs[0].logprobs or [{}])[0].items()
                        if lp.logprob is not None and math.isfinite(lp.logprob)
                    ]
                    for o in outs
                ]
                _send(
                    out,
                    {
                        "ok": True,
                        "top": top,
                        "engine_s": engine_s,
                        "prompt_tokens": sum(len(p) for p in req["prompts"]),
                        "cached_tokens": sum(int(o.num_cached_tokens or 0) for o in outs),
                    },
                )
            else:
                _send(out, {"ok": False, "error": f"unknown op {op!r}"})
        except Exception as exc:  # report any request failure to the client, keep serving
            _send(out, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    del llm
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)  # everything else printed to stdout (ours, vLLM's, children's) -> stderr
    sys.stdout = sys.stderr
    try:
        return serve(args, sys.stdin, protocol)
    except Exception as exc:  # start-up failure: tell the client why, then exit non-zero
        _send(protocol, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        raise


if __name__ == "__main__":
    sys.exit(main())
