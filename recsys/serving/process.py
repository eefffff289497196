"""Run a ``recsys serve ...`` server as a child process (benchmarks, demo, end-to-end test).

:class:`ServerProcess` starts ``recsys [-v] serve KIND ... --port 0
--port-file F`` in its own session, waits for the port file and for the standard health
check to answer SERVING (the server loads its models first), and stops it with SIGTERM
(graceful: in-flight calls finish), SIGKILL after a timeout. :meth:`ServerProcess.kill`
is the crash (SIGKILL at once), for fault-injection tests.

Example::

    with ServerProcess(["serve", "device", "--checkpoint", ckpt], name="device") as dev:
        dev.wait_ready(timeout=60)
        channel = grpc.insecure_channel(dev.target)
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys.errors import RecsysError

logger = logging.getLogger(__name__)

# the `recsys` console script's entry, run by this interpreter (no PATH lookup)
_ENTRY = "import sys; from recsys.cli import main; sys.exit(main(sys.argv[1:]))"


class ServerStartError(RecsysError):
    """A server process died or did not become healthy in time (the message has its log)."""


class ServerProcess:
    """A server child process (see the module docstring).

    Args:
        argv: arguments after ``recsys`` (e.g. ``["serve", "cloud", "--engine", "tiny", ...]``);
            ``--port``/``--port-file`` are added unless ``port`` is None and argv has them.
        name: for logs.
        port: the port to bind (0 = ephemeral, read back from the port file).
        env: extra environment variables.
        log_path: where the child's stdout/stderr go (default: a temporary file).
        tls_ca: PEM to trust for the health check when the server uses TLS.
        verbose: pass ``-v`` (INFO logs) to the child.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str = "server",
        port: int = 0,
        env: Mapping[str, str] | None = None,
        log_path: str | Path | None = None,
        tls_ca: str | Path | None = None,
        tls_server_name: str | None = None,
        verbose: bool = True,
    ) -> None:
        self.name = name
        self._tmp = tempfile.TemporaryDirectory(prefix=f"recsys-{name}-")
        self.port_file = Path(self._tmp.name) / "port"
        self.log_path = Path(log_path) if log_path else Path(self._tmp.name) / "server.log"
        self.argv = [
            *(["-v"] if verbose else []),
            *argv,
            "--port",
            str(port),
            "--port-file",
            str(self.port_file),
        ]
        self.env = {**os.environ, **(env or {})}
        self.tls_ca = tls_ca
        self.tls_server_name = tls_server_name
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None

    @property
    def target(self) -> str:
        if self.port is None:
            raise ServerStartError(f"{self.name} has no port yet; call wait_ready() first")
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        self.port_file.unlink(missing_ok=True)
        self.port = None
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child owns it)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ENTRY, *self.argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        log.close()
        logger.info("started %s (pid %d)", self.name, self.proc.pid)
        return self

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    def _channel(self) -> grpc.Channel:
        if self.tls_ca:
            options = []
            if self.tls_server_name:
                options.append(("grpc.ssl_target_name_override", self.tls_server_name))
            creds = grpc.ssl_channel_credentials(Path(self.tls_ca).read_bytes())
            return grpc.secure_channel(self.target, creds, options=options)
        return grpc.insecure_channel(self.target)

    def healthy(self, timeout: float = 1.0) -> bool:
        """True when the health check answers SERVING."""
        if self.port is None:
            return False
        with self._channel() as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=timeout
                )
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def wait_port(self, timeout: float = 120.0) -> int:
        """Wait until the server has bound its port (before its models are loaded)."""
        return self._wait(timeout, healthy=False)

    def wait_ready(self, timeout: float = 120.0) -> int:
        """Wait for the port file and health SERVING; returns the port."""
        return self._wait(timeout, healthy=True)

    def _wait(self, timeout: float, healthy: bool) -> int:
        if self.proc is None:
            self.start()
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(
                    f"{self.name} exited with code {self.proc.returncode}:\n{self.log_tail()}"
                )
            if self.port is None and self.port_file.is_file():
                text = self.port_file.read_text().strip()
                if text:
                    self.port = int(text)
            if self.port is not None and (not healthy or self.healthy()):
                if healthy:
                    logger.info("%s ready on port %d", self.name, self.port)
                return self.port
            time.sleep(0.1)
        what = "healthy" if healthy else "listening"
        raise ServerStartError(f"{self.name} not {what} after {timeout:.0f} s:\n{self.log_tail()}")

    def cpu_seconds(self) -> float | None:
        """User + system CPU time the server process has used so far (Linux /proc), or None."""
        if self.proc is None:
            return None
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (graceful), SIGKILL after ``timeout``; returns the exit code. Idempotent."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s ignored SIGTERM for %.0f s; killing it", self.name, timeout)
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL at once (a crash), and reap the process."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
