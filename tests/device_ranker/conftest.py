"""Fixtures for the device ranker tests (fast: tiny synthetic data, no real dataset)."""

from __future__ import annotations

import pytest
import torch
from ranker_helpers import make_dataset, tiny_model_config

from device_ranker.model import SeqRanker
from recsys.data import Dataset


@pytest.fixture(scope="session")
def tiny_ds() -> Dataset:
    return make_dataset()


@pytest.fixture
def tiny_model() -> SeqRanker:
    torch.manual_seed(0)
    return SeqRanker(tiny_model_config()).eval()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: these models are tiny, and on a shared 2-core machine two
    threads made training ~10x slower (spinning on a busy core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
