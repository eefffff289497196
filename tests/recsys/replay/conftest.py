"""Fixtures of the replay tests: one torch thread, and the tiny world built once."""

from __future__ import annotations

import pytest
import torch
from replay_world import World, build_world


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    torch.set_num_threads(1)
    return build_world(tmp_path_factory.mktemp("replay-world"))
