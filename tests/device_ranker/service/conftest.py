"""Fixtures of the device service tests: tiny artefacts, and a
device server (in this process) with a tiny cloud server beside it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from service_helpers import cloud_config, device_config, write_tiny_artifacts

from device_ranker.service.server import DeviceHandle, start_device
from llm_cloud.service.server import CloudHandle, start_cloud
from recsys.rpc.device.v1 import recommendation_pb2_grpc as pb_grpc


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset dir, ranker checkpoint): 24 users, 30 items, a ranker trained in seconds."""
    return write_tiny_artifacts(tmp_path_factory.mktemp("device-service"))


@pytest.fixture(scope="module")
def cloud(bg, artifacts, tmp_path_factory) -> Iterator[CloudHandle]:
    store = tmp_path_factory.mktemp("cloud") / "store.sqlite"
    handle = bg.run(start_cloud(cloud_config(artifacts, store)))
    yield handle
    bg.run(handle.stop(0))


@pytest.fixture(scope="module")
def device(bg, artifacts, cloud: CloudHandle) -> Iterator[DeviceHandle]:
    handle = bg.run(start_device(device_config(artifacts, cloud.port)))
    yield handle
    bg.run(handle.stop(0))


@pytest.fixture(scope="module")
def stub(device: DeviceHandle) -> Iterator[pb_grpc.RecommendationServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{device.port}") as channel:
        yield pb_grpc.RecommendationServiceStub(channel)
