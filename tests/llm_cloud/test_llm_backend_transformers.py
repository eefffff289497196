"""The transformers backend: only valid IDs, exact search, top_n, truncation, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llm_helpers import random_model_dir, tiny_ids

from codebook.semantic_ids import SemanticIdMap
from llm_cloud.backends import BackendConfig, make_backend
from llm_cloud.backends.base import Backend
from recsys.errors import NotFoundError, ValidationError


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny model over a 25-item codebook (peaky random logits)."""
    ids = tiny_ids(num_items=25, codes=5, seed=1)
    return random_model_dir(tmp_path_factory.mktemp("rand") / "m", ids, seed=1, max_history=6)


@pytest.fixture(scope="module")
def random_backend(random_dir: Path) -> Backend:
    return make_backend("transformers", random_dir)


@pytest.fixture(scope="module")
def backend(tiny_lm_dir: Path) -> Backend:
    return make_backend("transformers", tiny_lm_dir, BackendConfig(beam_width=8, batch_users=4))


def brute_force(backend: Backend, history: list[int]) -> list[tuple[int, float]]:
    """Every item's constrained log-prob by teacher forcing (one batch); best first."""
    vocab, model = backend.vocab, backend.model
    prompt = vocab.prompt_ids(history)
    paths = vocab.item_tokens.tolist()  # [I][D]
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + p for p in paths])).logits  # [I, T+D, V]
    scored = []
    for item, tokens in enumerate(paths):
        score = 0.0
        for level, token in enumerate(tokens):
            allowed = vocab.trie.allowed_next(tokens[:level])
            logp = torch.log_softmax(logits[item, len(prompt) - 1 + level, allowed], dim=-1)
            score += float(logp[allowed.index(token)])
        scored.append((item, score))
    return sorted(scored, key=lambda pair: -pair[1])


histories = st.lists(st.lists(st.integers(0, 24), max_size=12), min_size=1, max_size=6)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batch=histories, top_n=st.integers(1, 7), beams=st.integers(0, 6))
def test_only_valid_ids_sorted_and_unique(
    random_backend: Backend, batch, top_n: int, beams: int
) -> None:
    backend = random_backend
    backend.config = BackendConfig(beam_width=top_n + beams, batch_users=3)
    results = backend.generate(batch, top_n)
    assert len(results) == len(batch)
    for ranked in results:
        assert 1 <= len(ranked) <= top_n
        items = [i for i, _ in ranked]
        assert len(set(items)) == len(items)
        assert all(0 <= i < backend.vocab.num_items for i in items)
        scores = [s for _, s in ranked]
        assert scores == sorted(scores, reverse=True) and all(s <= 1e-6 for s in scores)
        for item in items:  # each is a full path of the trie, i.e. a catalogue ID
            assert backend.vocab.trie.is_complete(backend.vocab.item_tokens[item].tolist())


def test_full_beam_search_is_exact(backend: Backend, tiny_lm_dir: Path) -> None:
    exact = make_backend("transformers", tiny_lm_dir, BackendConfig(beam_width=40, batch_users=2))
    batch = [[1, 2, 3], [], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39]]
    for history, ranked in zip(batch, exact.generate(batch, 5), strict=True):
        expected = brute_force(exact, history)[:5]
        assert [i for i, _ in ranked] == [i for i, _ in expected]
        assert [s for _, s in ranked] == pytest.approx([s for _, s in expected], abs=1e-4)


def test_batching_and_padding_do_not_change_results(backend: Backend) -> None:
    batch = [[1, 2, 3], [], [5], [10, 11, 12, 13, 14, 15, 16, 17], [20, 21]]
    together = backend.generate(batch, 5)
    alone = [backend.generate([h], 5)[0] for h in batch]
    for a, b in zip(together, alone, strict=True):
        assert [i for i, _ in a] == [i for i, _ in b]
        assert [s for _, s in a] == pytest.approx([s for _, s in b], abs=1e-4)


def test_top_n_truncation_and_empty_history(backend: Backend) -> None:
    assert [len(r) for r in backend.generate([[1, 2], [3]], 1)] == [1, 1]
    long = list(range(30))
    assert backend.generate([long], 5) == backend.generate([long[-8:]], 5)  # max_history 8
    empty = backend.generate([[]], 5)[0]  # the LM's prior given "<bos><user><sep>"
    assert len(empty) == 5 and empty == backend.generate([[]], 5)[0]
    assert backend.generate([], 5) == []
    assert backend.generate([np.array([1, 2])], 3) == backend.generate([[1, 2]], 3)


def test_bad_input_raises_domain_errors(backend: Backend) -> None:
    with pytest.raises(NotFoundError):
        backend.generate([[1, 40]], 5)
    with pytest.raises(NotFoundError):
        backend.generate([[-3]], 5)
    with pytest.raises(ValidationError):
        backend.generate([[1.5]], 5)
    with pytest.raises(ValidationError):
        backend.generate([[1]], 0)
    with pytest.raises(ValidationError):
        backend.generate("1 2 3", 5)
    with pytest.raises(ValidationError, match="beam_width"):
        backend.generate([[1]], 9)  # beam 8 < top_n 9
    with pytest.raises(ValidationError, match="unknown LLM backend"):
        make_backend("tensorrt", "x")


def test_exclude_history_fills_with_unseen_items(tiny_lm_dir: Path, backend: Backend) -> None:
    history = [4, 5, 6]
    plain = [i for i, _ in backend.generate([history], 8)[0]]
    cfg = BackendConfig(beam_width=8, exclude_history=True)
    unseen = make_backend("transformers", tiny_lm_dir, cfg).generate([history + plain[:2]], 8)[0]
    assert len(unseen) == 8 and not set(i for i, _ in unseen) & set(history + plain[:2])


def test_hf_generate_search_returns_valid_ids(tiny_lm_dir: Path, backend: Backend) -> None:
    hf = make_backend("transformers", tiny_lm_dir, BackendConfig(beam_width=8), search="hf")
    batch = [[1, 2, 3], [], [20]]
    for ranked, ours in zip(hf.generate(batch, 4), backend.generate(batch, 4), strict=True):
        assert 1 <= len(ranked) <= 4 and all(0 <= i < 40 for i, _ in ranked)
        assert ranked[0][0] == ours[0][0]  # same best item; scores differ (unnormalised)


def test_a_foreign_model_directory_works_with_an_explicit_codebook(
    ids: SemanticIdMap, tmp_path: Path
) -> None:
    """The GPU recipe on a tiny 'pretrained' model: extend its vocabulary, then serve it."""
    from test_llm_tokenizer import _foreign_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from llm_cloud.lm_train import prepare_base_model

    base = tmp_path / "base"
    tok = _foreign_tokenizer(ids, with_codebook=False)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                      bos_token_id=2, eos_token_id=3, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(base)
    tok.save_pretrained(base)
    model, extended = prepare_base_model(str(base), ids)
    out = tmp_path / "extended"
    model.save_pretrained(out)
    extended.save_pretrained(out)
    ids.save(tmp_path / "cb")
    with pytest.raises(ValidationError, match="codebook"):
        make_backend("transformers", out)  # no codebook inside: must be told
    foreign = make_backend("transformers", out, BackendConfig(codebook_dir=tmp_path / "cb"))
    assert foreign.vocab.item_tokens.min() >= 7  # ids after the base vocabulary, not 6 + p
    ranked = foreign.generate([[1, 2], []], 5)
    assert all(len(r) == 5 and all(0 <= i < ids.num_items for i, _ in r) for r in ranked)


def test_backend_config_is_validated_and_frozen() -> None:
    import dataclasses

    from recsys.errors import ValidationError

    with pytest.raises(ValidationError, match="BackendConfig: batch_users"):
        BackendConfig(batch_users=0)
    with pytest.raises(ValidationError, match="BackendConfig: beam_width"):
        BackendConfig(beam_width=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        BackendConfig().exclude_history = True  # type: ignore[misc]


def test_batches_of_users_give_the_same_results(tiny_lm_dir: Path) -> None:
    """Backend.generate splits users into config.batch_users batches (in_user_batches)."""
    histories = [[i % 40, (3 * i) % 40] for i in range(7)]
    one = make_backend("transformers", tiny_lm_dir, BackendConfig(beam_width=6, batch_users=7))
    many = make_backend("transformers", tiny_lm_dir, BackendConfig(beam_width=6, batch_users=2))
    got, want = many.generate(histories, 4), one.generate(histories, 4)
    assert [[i for i, _ in r] for r in got] == [[i for i, _ in r] for r in want]
    for a, b in zip(got, want, strict=True):
        assert [s for _, s in a] == pytest.approx([s for _, s in b], abs=1e-5)
