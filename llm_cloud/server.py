"""Start and stop vLLM processes: the OpenAI-compatible server (``recsys serve llm``).

Shapes: none (process management).

:class:`VllmServer` runs ``python -m vllm.entrypoints.openai.api_server`` from the
vLLM environment (:mod:`llm_cloud.vllm_env`) on 127.0.0.1 with the trie logits
processor registered and processed log-probs (what :mod:`llm_cloud.beam` needs), waits
for ``GET /health`` = 200, and stops it with SIGTERM (then SIGKILL after a grace period)
sent to its own process group, so the engine-core and worker processes go too. vLLM
needs 20-45 s to start here and ~2.7 GB RSS: start one per session, never two at once.

Example::

    with VllmServer(ServerConfig(model_dir="artifacts/ml-100k/lm")) as server:
        backend = OpenAIBackend("artifacts/ml-100k/lm", url=server.url)
        backend.generate([[3, 17]], top_n=10)
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import Field

from llm_cloud.vllm_env import LOGITS_PROCESSOR, check_head_dim, find_vllm_python, vllm_child_env
from recsys.errors import RecsysError
from recsys.validation import config_dataclass

logger = logging.getLogger(__name__)


class ServerError(RecsysError):
    """A vLLM process failed to start, died, or did not answer."""


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral TCP port that is free right now on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def stop_process_group(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """Stop a process started with ``start_new_session=True`` and everything in its group.

    SIGTERM to the leader (vLLM shuts its engine processes down on it), wait up to
    ``grace`` seconds for the leader and then for the rest of the group, SIGKILL what is
    left. Idempotent.
    """
    pgid = proc.pid  # a new session makes the leader's pid the group id
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            logger.warning("process %d ignored SIGTERM for %.0f s; killing its group", pgid, grace)
            _killpg(pgid, signal.SIGKILL)
            proc.wait(timeout=10)
    deadline = time.monotonic() + grace
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            logger.warning("processes of group %d still alive; SIGKILL", pgid)
            _killpg(pgid, signal.SIGKILL)
            time.sleep(0.5)
            break
        time.sleep(0.2)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def live_group_members(pgid: int) -> list[int]:
    """Pids of the non-zombie processes of group ``pgid`` (from /proc; where there is no
    /proc, [pgid] while the group exists). Zombies are ignored: an orphan is reaped by
    init, which may take its time (or never happen in a minimal container)."""
    proc_root = Path("/proc")
    if not proc_root.is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp ...
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _group_alive(pgid: int) -> bool:
    return bool(live_group_members(pgid))


def open_log(path: str | Path | None, prefix: str) -> tuple[Path, IO[bytes]]:
    """(path, binary handle) of a child process's log: ``path``, or a new temporary file.
    The caller keeps the handle open while the child runs and closes it afterwards."""
    if path:
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        return dest, dest.open("wb")
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".log")
    return Path(name), os.fdopen(fd, "wb")


def launch(
    cmd: list[str], what: str, log_path: Path, kv_cache_gib: int, **streams: Any
) -> subprocess.Popen:
    """Start ``cmd`` (a vLLM process) with :func:`vllm_child_env` in its own process
    group, so :func:`stop_process_group` reaches the engine processes it forks too.
    ``streams``: the stdin / stdout / stderr (and text-mode) arguments of ``Popen``."""
    logger.info("starting %s: %s (log %s)", what, " ".join(cmd), log_path)
    return subprocess.Popen(
        cmd, env=vllm_child_env(kv_cache_gib=kv_cache_gib), start_new_session=True, **streams
    )


def log_tail(path: Path | None, lines: int = 25) -> str:
    """The last ``lines`` lines of a log file ('' if unreadable)."""
    if path is None:
        return ""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@config_dataclass
class ServerConfig:
    """How to run the vLLM OpenAI-compatible server (validated and frozen).

    Attributes:
        model_dir: HF model directory to serve.
        host: bind address (loopback by default; put a proxy in front for remote use).
        port: TCP port; 0 = pick a free one.
        served_model_name: the ``model`` name clients send.
        dtype: "bfloat16" (fast on AVX-512/AMX CPUs) or "float32" (bit-closer to the
            transformers backend).
        max_model_len: longest prompt + answer in tokens.
        max_logprobs: largest ``logprobs`` a request may ask for (>= beam width).
        kv_cache_gib: ``VLLM_CPU_KVCACHE_SPACE``.
        block_size: KV-cache block in tokens; 32 lets the beams of one user share the
            prompt's full blocks through prefix caching (vLLM-CPU's default 128 is longer
            than our prompts, so nothing would be shared).
        python: interpreter with vLLM (None: :func:`find_vllm_python`).
        log_path: where the server's output goes (None: a temporary file).
        startup_timeout: seconds to wait for /health.
        extra_args: more command-line arguments for the server.
    """

    model_dir: str | Path
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(0, ge=0, le=65535)
    served_model_name: str = Field("recsys-lm", min_length=1)
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    max_model_len: int = Field(512, ge=16)
    max_logprobs: int = Field(64, ge=1)
    kv_cache_gib: int = Field(1, ge=1)
    block_size: int = Field(32, ge=1)
    python: str | Path | None = None
    log_path: str | Path | None = None
    startup_timeout: float = Field(600.0, gt=0)
    extra_args: list[str] = Field(default_factory=list)

    def command(self, python: Path, port: int) -> list[str]:
        return [
            str(python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(Path(self.model_dir).resolve()),
            "--served-model-name", self.served_model_name,
            "--host", self.host, "--port", str(port),
            "--dtype", self.dtype, "--enforce-eager",
            "--max-model-len", str(self.max_model_len),
            "--logits-processors", LOGITS_PROCESSOR,
            "--logprobs-mode", "processed_logprobs",
            "--max-logprobs", str(self.max_logprobs),
            "--block-size", str(self.block_size),
            "--seed", "0",
            *self.extra_args,
        ]  # fmt: skip


class VllmServer:
    """The vLLM OpenAI-compatible server as a child process (see the module docstring)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.log_path: Path | None = None
        self.startup_seconds: float | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise ServerError("the server is not started")
        return f"http://{self.config.host}:{self.port}"

    def start(self) -> VllmServer:
        """Start the process and block until /health answers 200 (or raise ServerError)."""
        if self.proc is not None:
            return self
        cfg = self.config
        python = find_vllm_python(cfg.python)
        check_head_dim(cfg.model_dir)
        self.port = cfg.port or free_port(cfg.host)
        self.log_path, self._log = open_log(cfg.log_path, "vllm-server-")
        cmd = cfg.command(python, self.port)
        start = time.perf_counter()
        self.proc = launch(
            cmd,
            "vLLM server",
            self.log_path,
            cfg.kv_cache_gib,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_healthy(start + cfg.startup_timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.perf_counter() - start
        logger.info("vLLM server healthy at %s after %.1f s", self.url, self.startup_seconds)
        return self

    def _wait_healthy(self, deadline: float) -> None:
        assert self.proc is not None
        while True:
            code = self.proc.poll()
            if code is not None:
                raise ServerError(
                    f"the vLLM server exited with code {code} during start-up; log "
                    f"{self.log_path}:\n{log_tail(self.log_path)}"
                )
            if self.healthy():
                return
            if time.perf_counter() > deadline:
                raise ServerError(
                    f"the vLLM server did not become healthy within {self.config.startup_timeout:.0f} s; "
                    f"log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            time.sleep(1.0)

    def healthy(self) -> bool:
        """Whether GET /health answers 200 right now."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM the server and its engine processes; SIGKILL after ``grace`` (idempotent)."""
        if self.proc is not None:
            stop_process_group(self.proc, grace)
            logger.info("vLLM server stopped (exit code %s)", self.proc.returncode)
            if not self.config.log_path and self.proc.returncode == 0 and self.log_path:
                self.log_path.unlink(missing_ok=True)  # a temporary log of a clean run
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def info(self) -> dict[str, Any]:
        return {
            "url": self.url if self.port else None,
            "pid": self.proc.pid if self.proc else None,
            "startup_s": self.startup_seconds,
            "log": str(self.log_path) if self.log_path else None,
        }

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
