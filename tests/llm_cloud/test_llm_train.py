"""Training the codebook LM: windows, loss weights, seeded determinism, the saved directory."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from llm_helpers import tiny_config, train_tiny

from codebook.semantic_ids import SemanticIdMap
from llm_cloud.artifact import META_FILE, TRIE_FILE, codes_fingerprint, load_item_vocab, read_meta
from llm_cloud.lm_train import (
    LMConfig,
    build_windows,
    dataset_sequences,
    encode_window,
    window_ends,
)
from llm_cloud.prompts import ItemVocab
from llm_cloud.tokenizer import build_tokenizer
from recsys.errors import ValidationError


def test_window_ends_cover_the_sequence() -> None:
    assert window_ends(1, 4, 0) == []
    assert window_ends(2, 4, 0) == [1]
    assert window_ends(10, 4, 0) == [9, 5, 1]
    assert window_ends(10, 4, 2) == [9, 7, 3]
    windows = build_windows([np.arange(10)], max_history=3, stride=4, rng=None)
    assert [w.tolist() for w in windows] == [[6, 7, 8, 9], [2, 3, 4, 5], [0, 1]]


def test_window_encoding_and_loss_weights(ids: SemanticIdMap) -> None:
    vocab = ItemVocab.from_tokenizer(build_tokenizer(ids), ids, max_history=4)
    tokens, weights = encode_window(vocab, [3, 9, 4], history_weight=0.5)
    d = vocab.depth
    assert tokens == [*vocab.prompt_ids([3, 9]), *vocab.item_tokens[4], vocab.specials.eos]
    assert weights == [0.0, 0.0] + [0.5] * (2 * d) + [0.0] + [1.0] * (d + 1)


def test_head_dim_must_suit_vllm_cpu() -> None:
    with pytest.raises(ValidationError, match="head_dim 16 is not supported"):
        LMConfig(head_dim=16)
    assert LMConfig(head_dim=64).head_dim == 64
    assert LMConfig(head_dim=16, base_model="some/pretrained").head_dim == 16  # GPU path


@pytest.mark.parametrize(
    ("field", "value"),
    [("epochs", 0), ("lr", 0.0), ("max_history", 0), ("attention_dropout", 1.0), ("threads", 0)],
)
def test_config_ranges_fail_at_construction(field: str, value: float) -> None:
    with pytest.raises(ValidationError, match=f"LMConfig: {field}"):
        LMConfig(**{field: value})
    with pytest.raises(dataclasses.FrozenInstanceError):
        LMConfig().epochs = 3  # type: ignore[misc]


def test_training_is_deterministic_with_a_seed(ids: SemanticIdMap) -> None:
    a = train_tiny(ids, seed=3, epochs=2)
    b = train_tiny(ids, seed=3, epochs=2)
    c = train_tiny(ids, seed=4, epochs=2)
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    for (name, x), (_, y) in zip(
        a.model.state_dict().items(), b.model.state_dict().items(), strict=True
    ):
        assert torch.equal(x, y), name
    assert a.history[0]["train_loss"] != c.history[0]["train_loss"]
    assert a.history[-1]["valid_nll"] < a.history[0]["valid_nll"] + 1.0  # it trains, not diverges


def test_saved_directory_reloads_unchanged(tiny_lm_dir: Path, ids: SemanticIdMap) -> None:
    from transformers import AutoModelForCausalLM

    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", TRIE_FILE, META_FILE, "codebook/semantic_ids.npy"):  # fmt: skip
        assert (tiny_lm_dir / name).is_file(), name
    config = json.loads((tiny_lm_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["head_dim"] == 32
    meta = read_meta(tiny_lm_dir)
    assert meta["codebook"]["codes_fingerprint"] == codes_fingerprint(ids.codes)
    assert meta["max_history"] == 8 and meta["config"]["seed"] == 0
    vocab, _ = load_item_vocab(tiny_lm_dir)
    assert np.array_equal(vocab.ids.codes, ids.codes) and vocab.max_history == 8
    assert json.loads((tiny_lm_dir / TRIE_FILE).read_text()) == vocab.item_tokens.tolist()
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    prompt = torch.tensor([vocab.prompt_ids([1, 2, 3])])
    with torch.inference_mode():
        first = model(prompt).logits
        again = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()(prompt).logits
    assert torch.equal(first, again)


def test_wrong_codebook_is_refused(tiny_lm_dir: Path, tmp_path: Path) -> None:
    other = SemanticIdMap.from_codes(np.arange(80).reshape(40, 2) % 7, 7)
    other.save(tmp_path / "cb")
    with pytest.raises(ValidationError, match="not the one"):
        load_item_vocab(tiny_lm_dir, codebook_dir=tmp_path / "cb")


def test_dataset_sequences_follow_the_split_protocols() -> None:
    from recsys.data.canonical import Dataset

    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(6)]})
    rows = [("u0", f"i{i}", t) for t, i in enumerate([0, 1, 2, 3, 4])] + [
        ("u1", f"i{i}", 10 + t) for t, i in enumerate([5, 4, 3])
    ]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    ds = Dataset("toy", items, inter, info={"text_columns": []})
    seqs, pairs, info = dataset_sequences(ds, "loo")
    assert info["split"] == "loo"
    u0 = ds.user_ids.tolist().index("u0")
    assert seqs[u0].tolist() == [0, 1, 2]  # last two events held out (valid, test)
    assert (pairs[0][0].tolist(), pairs[0][1]) == ([0, 1, 2], 3)
    with pytest.raises(ValidationError):
        dataset_sequences(ds, "random")


def test_tiny_config_fits_positions() -> None:
    with pytest.raises(ValidationError, match="positions"):
        from llm_helpers import tiny_ids

        train_tiny(tiny_ids(), max_history=40, max_position_embeddings=64)
    assert tiny_config().head_dim == 32
