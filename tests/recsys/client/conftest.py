"""Fixtures of the client tests: the device service tests' tiny artefacts and configs
(``tests/device_ranker/service/service_helpers.py``), a signing key, and in-process
servers on loopback ports (a tiny cloud, and a device linked to it, both requiring
tokens)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parents[2]
for _dir in (_TESTS / "device_ranker", _TESTS / "device_ranker" / "service"):
    if str(_dir) not in sys.path:
        sys.path.insert(0, str(_dir))

from service_helpers import (  # noqa: E402
    cloud_config,
    device_config,
    write_tiny_artifacts,
)

from device_ranker.service.config import CloudLinkConfig  # noqa: E402
from device_ranker.service.server import DeviceHandle, start_device  # noqa: E402
from llm_cloud.service.server import CloudHandle, start_cloud  # noqa: E402
from recsys.serving.auth import AuthConfig, issue_token  # noqa: E402
from recsys.serving.keys import SigningKey, generate_key, write_key  # noqa: E402


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset dir, ranker checkpoint): 24 users u0..u23, 30 items i0..i29."""
    return write_tiny_artifacts(tmp_path_factory.mktemp("client-artifacts"))


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SigningKey]:
    path = tmp_path_factory.mktemp("keys") / "k1.key"
    key = generate_key("k1")
    write_key(key, path)
    return path, key


@pytest.fixture(scope="module")
def operator_token(key) -> str:
    return issue_token(key[1], "ops", role="operator")


@pytest.fixture(scope="module")
def cloud(bg, artifacts, key, tmp_path_factory) -> Iterator[CloudHandle]:
    store = tmp_path_factory.mktemp("cloud") / "store.sqlite"
    handle = bg.run(
        start_cloud(cloud_config(artifacts, store, auth=AuthConfig(keys=(str(key[0]),))))
    )
    yield handle
    bg.run(handle.stop(0))


@pytest.fixture(scope="module")
def device(bg, artifacts, key, cloud, operator_token, tmp_path_factory) -> Iterator[DeviceHandle]:
    """A device server requiring tokens, linked to the cloud with an operator token."""
    token_file = tmp_path_factory.mktemp("link") / "link.token"
    token_file.write_text(operator_token + "\n")
    cfg = device_config(
        artifacts,
        auth=AuthConfig(keys=(str(key[0]),)),
        cloud=CloudLinkConfig(target=f"127.0.0.1:{cloud.port}", deadline_s=5.0,
                              probe_interval_s=0.2, token_file=str(token_file)),
    )  # fmt: skip
    handle = bg.run(start_device(cfg))
    yield handle
    bg.run(handle.stop(0))
