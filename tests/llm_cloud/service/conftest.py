"""Fixtures of the cloud service tests: a tiny engine with a SQLite store, a server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cloud_helpers import HEAD, ITEMS, start, write_catalogue

from llm_cloud.service.server import CloudHandle
from llm_cloud.service.tiny import build_tiny_engine
from recsys.rpc.cloud.v1 import adaptation_pb2_grpc as cpb_grpc
from recsys.serving.batching import BatchConfig


@pytest.fixture
def tiny_engine(tmp_path: Path):
    engine = build_tiny_engine(ITEMS, HEAD, store_url=f"sqlite:///{tmp_path / 'store.sqlite'}")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_catalogue(tmp_path_factory.mktemp("catalogue"))


@pytest.fixture(scope="module")
def cloud(bg, catalogue, tmp_path_factory) -> Iterator[CloudHandle]:
    handle = start(
        bg, catalogue, tmp_path_factory.mktemp("store") / "s.sqlite",
        batch=BatchConfig(max_batch=32, max_wait_ms=20),
    )  # fmt: skip
    yield handle
    bg.run(handle.stop(0))


@pytest.fixture(scope="module")
def stub(cloud: CloudHandle) -> Iterator[cpb_grpc.AdaptationServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{cloud.port}") as channel:
        yield cpb_grpc.AdaptationServiceStub(channel)
