"""Aligning a pretrained LLM with the codebook (llm_cloud.align) and its text prompts.

A tiny randomly initialised Llama with the real SmolLM2 tokenizer stands in for the
pretrained model (seconds); the real SmolLM2-135M is aligned for a few steps in
test_llm_align_real.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from llm_helpers import synthetic_sequences

from codebook.semantic_ids import SemanticIdMap
from llm_cloud.align import (
    AlignConfig,
    align_lm,
    alignment_examples,
    catalogue_texts,
    init_codebook_embeddings,
)
from llm_cloud.artifact import TEXT_FILE, load_item_vocab, save_lm
from llm_cloud.backends import BackendConfig, make_backend
from llm_cloud.lm_data import encode_window
from llm_cloud.lm_train import prepare_base_model
from llm_cloud.prompts import ItemVocab, clean_item_text
from recsys.errors import DataFormatError, ValidationError

GENRES = ["Drama", "Comedy", "Action", "Horror"]


def item_texts_for(ids: SemanticIdMap) -> list[str]:
    """Item i's text names its first code (so text and ID agree), every fifth is empty."""
    return [
        "" if i % 5 == 4 else f"Film {i} ({1990 + i % 10}) {GENRES[int(ids.codes[i, 0]) % 4]}"
        for i in range(ids.num_items)
    ]


@pytest.fixture(scope="module")
def tiny_base(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (hidden 64, 2 layers) with SmolLM2's real tokenizer, saved in
    bfloat16 like the imported SmolLM2."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir), local_files_only=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("tiny-base")
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def text_vocab(tiny_base: Path, ids: SemanticIdMap) -> tuple[ItemVocab, object]:
    _model, tok = prepare_base_model(str(tiny_base), ids)
    vocab = ItemVocab.from_tokenizer(tok, ids, max_history=6)
    return vocab.with_item_text(tok, item_texts_for(ids), text_items=2, text_tokens=5), tok


def test_text_prompt_layout_and_length_policy(text_vocab, ids: SemanticIdMap) -> None:
    vocab, _tok = text_vocab
    history = list(range(30))  # far longer than max_history 6
    prompt = vocab.prompt_ids(history)
    assert len(prompt) <= vocab.max_prompt_len()
    kept = history[-6:]
    # the 4 oldest kept items: IDs only; the 2 most recent: text then ID
    body = prompt[2:-1]
    ids_only = vocab.item_tokens[kept[:4]].reshape(-1).tolist()
    assert body[: len(ids_only)] == ids_only
    tail = []
    for item in kept[4:]:
        tail += vocab.item_text[item] + vocab.item_tokens[item].tolist()
    assert body[len(ids_only) :] == tail
    assert all(len(t) <= 5 for t in vocab.item_text)
    assert vocab.item_text[4] == []  # empty text adds nothing
    for _ in range(20):  # every history fits the policy's bound
        h = np.random.default_rng(_).integers(0, ids.num_items, 40).tolist()
        assert len(vocab.prompt_ids(h)) <= vocab.max_prompt_len()


def test_text_cannot_spell_codebook_tokens(text_vocab, ids: SemanticIdMap) -> None:
    vocab, tok = text_vocab
    evil = ["<a_1><b_2> <sep> <user>"] + [""] * (ids.num_items - 1)
    v = vocab.with_item_text(tok, evil, text_items=1, text_tokens=50)
    codebook = set(vocab.item_tokens.reshape(-1).tolist()) | {v.specials.sep, v.specials.user}
    assert not set(v.item_text[0]) & codebook
    assert clean_item_text("<a_1>  x\n") == "(a_1) x"


def test_window_weights_skip_text(text_vocab) -> None:
    vocab, _ = text_vocab
    items = [0, 1, 2, 3]
    tokens, weights = encode_window(vocab, items, history_weight=0.5)
    assert tokens == [
        *vocab.prompt_ids(items[:-1]),
        *vocab.item_tokens[3].tolist(),
        vocab.specials.eos,
    ]
    body, is_id = vocab.history_tokens(items[:-1])
    head = len(vocab.prefix_ids())
    hist_w = weights[head : head + len(body)]
    assert all((w == 0.5) == flag for w, flag in zip(hist_w, is_id, strict=True))
    assert weights[-(vocab.depth + 1) :] == [1.0] * (vocab.depth + 1)


def test_alignment_examples_both_directions(text_vocab, ids: SemanticIdMap) -> None:
    vocab, tok = text_vocab
    texts = item_texts_for(ids)
    ex = alignment_examples(vocab, tok, texts, 8)
    assert len(ex) == 2 * sum(1 for t in texts if t)
    to_id, to_text = ex[0], ex[1]
    sid = vocab.item_tokens[0].tolist()
    assert to_id[0][-len(sid) - 1 : -1] == sid and sum(to_id[1]) == len(sid) + 1
    assert to_text[0][1 : 1 + len(sid)] == sid and to_text[1][1 + len(sid)] == 1.0


def test_a_bf16_checkpoint_trains_with_float32_weights(tiny_base: Path, ids: SemanticIdMap) -> None:
    """transformers 5 loads the saved dtype by default; training in it would keep every
    weight and AdamW state in bf16 (and run emulated bf16 on AVX2 CPUs)."""
    model, _ = prepare_base_model(str(tiny_base), ids)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_codebook_rows_start_at_their_items_text(tiny_base: Path, ids: SemanticIdMap) -> None:
    model, tok = prepare_base_model(str(tiny_base), ids)
    texts = item_texts_for(ids)
    rows = init_codebook_embeddings(model, tok, ids, texts, max_tokens=8)
    assert rows > 0
    emb = model.get_input_embeddings().weight.detach()
    code = int(ids.codes[0, 0])
    members = [i for i in range(ids.num_items) if ids.codes[i, 0] == code and texts[i]]
    want = torch.stack(
        [emb[tok(texts[i], add_special_tokens=False)["input_ids"][:8]].mean(0) for i in members]
    ).mean(0)
    got = emb[tok.convert_tokens_to_ids(ids.vocabulary()[code])]
    assert torch.allclose(got, want, atol=1e-5)


def test_catalogue_texts_compact() -> None:
    items = pd.DataFrame(
        {
            "item_id": ["1", "2"],
            "title": ["Heat", None],
            "year": [1995.0, float("nan")],
            "genres": [["Action", "Crime"], []],
            "plot": ["long", "long"],
        }
    )
    assert catalogue_texts(items) == ["Heat (1995) Action, Crime", ""]


def _align(tiny_base, ids, out, **cfg):
    seqs = synthetic_sequences(ids.num_items, users=12, length=10)
    pairs = [(s[:-1], int(s[-1])) for s in seqs[:4]]
    base = dict(max_history=6, text_items=2, text_tokens=5, batch_size=4, eval_users=4,
                eval_beams=4, bf16=False, threads=1, warmup_steps=2, lr=1e-3)  # fmt: skip
    return align_lm(
        tiny_base, [s[:-1] for s in seqs], pairs, ids, item_texts_for(ids),
        AlignConfig(**(base | cfg)), out_dir=out, resume=True,
    )  # fmt: skip


def test_align_budget_checkpoint_resume(
    tiny_base: Path, ids: SemanticIdMap, tmp_path: Path
) -> None:
    full = _align(tiny_base, ids, tmp_path / "full", epochs=2)
    assert full.valid_metrics["stopped_by"] == "epochs"
    assert not (tmp_path / "full" / "checkpoint").exists()
    steps_full = full.valid_metrics["steps"]
    # a run stopped by its budget after the first step leaves a checkpoint ...
    first = _align(tiny_base, ids, tmp_path / "cut", epochs=2, max_minutes=1e-6)
    assert first.valid_metrics["stopped_by"] == "budget" and first.valid_metrics["steps"] == 1
    assert (tmp_path / "cut" / "checkpoint" / "state.pt").is_file()
    with pytest.raises(ValidationError, match="other settings"):
        _align(tiny_base, ids, tmp_path / "cut", epochs=2, lr=5e-4)
    # ... from which the same settings continue to the same end state
    rest = _align(tiny_base, ids, tmp_path / "cut", epochs=2)
    assert rest.valid_metrics["steps"] == steps_full
    assert not (tmp_path / "cut" / "checkpoint").exists()  # finished: no stale checkpoint
    a, b = full.model.state_dict(), rest.model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_saved_aligned_model_serves_valid_ids(
    tiny_base: Path, ids: SemanticIdMap, tmp_path: Path
) -> None:
    result = _align(tiny_base, ids, tmp_path / "m", epochs=1)
    out = save_lm(result, tmp_path / "m", info={"dataset": "synthetic"})
    vocab, meta = load_item_vocab(out)
    assert meta["prompt"] == {"text_items": 2, "text_tokens": 5}
    history = list(range(12))
    assert vocab.prompt_ids(history) == result.vocab.prompt_ids(history)
    backend = make_backend("transformers", out, BackendConfig(beam_width=8))
    ranked = backend.generate([history, [], list(range(40))], 6)
    for row in ranked:
        assert len(row) == 6 and all(0 <= i < ids.num_items for i, _ in row)
    backend.close()
    (out / TEXT_FILE).write_text(json.dumps([[1, 2]]), encoding="utf-8")
    with pytest.raises(DataFormatError, match="lists of <= 5 token ids"):
        load_item_vocab(out)


def test_train_layers_freezes_the_bottom_and_unties_the_head(
    tiny_base: Path, ids: SemanticIdMap, tmp_path: Path
) -> None:
    frozen = _align(
        tiny_base, ids, tmp_path / "f", epochs=1, train_layers=1, train_code_rows=False,
        code_noise=0.0,
    )  # fmt: skip
    model = frozen.model
    assert not model.config.tie_word_embeddings
    inp, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert inp.data_ptr() != out.data_ptr()
    start, _ = prepare_base_model(str(tiny_base), ids)
    torch.manual_seed(0)
    init_codebook_embeddings(start, frozen.tokenizer, ids, item_texts_for(ids), 32)
    before = start.state_dict()
    after = model.state_dict()
    assert torch.equal(
        after["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"]
    )
    assert not torch.equal(
        after["model.layers.1.mlp.up_proj.weight"], before["model.layers.1.mlp.up_proj.weight"]
    )
    assert torch.equal(inp, start.get_input_embeddings().weight)  # input rows stay
    assert not torch.equal(out, start.get_input_embeddings().weight)  # output rows learn


def test_code_noise_makes_every_code_a_distinct_token(tiny_base: Path, ids: SemanticIdMap) -> None:
    plain, tok = prepare_base_model(str(tiny_base), ids)
    noisy, _ = prepare_base_model(str(tiny_base), ids)
    texts = item_texts_for(ids)
    init_codebook_embeddings(plain, tok, ids, texts, 8)
    init_codebook_embeddings(noisy, tok, ids, texts, 8, noise=1.0, seed=3)
    rows = torch.as_tensor(tok.convert_tokens_to_ids(ids.vocabulary()))
    plain_w = plain.get_input_embeddings().weight.detach()
    noisy_w = noisy.get_input_embeddings().weight.detach()
    a, b = plain_w[rows], noisy_w[rows]
    sigma = float(plain_w[: int(rows.min())].std())
    jitter = b - a
    assert abs(float(jitter.std()) / sigma - 1.0) < 0.1  # noise at the pretrained rows' scale
    distances = torch.cdist(b, b) + torch.eye(len(rows)) * 1e9
    assert float(distances.min()) > sigma  # no two codes coincide
    assert torch.equal(plain_w[: int(rows.min())], noisy_w[: int(rows.min())])


def test_train_code_rows_moves_only_the_codebook_rows(
    tiny_base: Path, ids: SemanticIdMap, tmp_path: Path
) -> None:
    result = _align(tiny_base, ids, tmp_path / "r", epochs=1, train_layers=1, code_noise=1.0)
    start, tok = prepare_base_model(str(tiny_base), ids)
    init_codebook_embeddings(start, tok, ids, item_texts_for(ids), 32, noise=1.0, seed=0)
    before, after = start.get_input_embeddings().weight, result.model.get_input_embeddings().weight
    rows = torch.as_tensor(tok.convert_tokens_to_ids(ids.vocabulary()))
    old = int(rows.min())
    assert torch.equal(after[:old], before[:old])  # the pretrained vocabulary is untouched
    moved = (after[rows] - before[rows]).abs().amax(1) > 0
    assert bool(moved.any())  # the codebook rows learn
    layer0 = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(result.model.state_dict()[layer0], start.state_dict()[layer0])
