"""The metrics endpoint of a TLS server is HTTPS with the server's own certificate: a real
gRPC server on loopback with a self-signed pair and ``metrics_port=0``."""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from service_helpers import self_signed_cert

from recsys.serving.server import GrpcServer, ServerOptions


def test_a_tls_server_serves_its_metrics_over_https_only(bg, tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    server = GrpcServer(ServerOptions(tls_cert=str(cert), tls_key=str(key), metrics_port=0))
    bg.run(server.start())
    try:
        port = server.metrics.port
        trusted = ssl.create_default_context(cafile=str(cert))
        url = f"https://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, context=trusted, timeout=10) as reply:
            assert b"recsys_rpc_requests_total" in reply.read()
        with pytest.raises(urllib.error.URLError):  # another CA's client refuses the server
            urllib.request.urlopen(url, context=ssl.create_default_context(), timeout=10)
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # no plaintext
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)
    finally:
        bg.run(server.stop(0))
