"""The codebook LM tokenizer: vocabulary order, round trips, lookup in foreign tokenizers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from codebook.semantic_ids import SemanticIdMap
from llm_cloud.prompts import ItemVocab
from llm_cloud.tokenizer import (
    NUM_SPECIAL,
    SPECIAL_TOKENS,
    build_tokenizer,
    item_token_matrix,
    load_tokenizer,
    special_ids,
)
from recsys.errors import NotFoundError, ValidationError


def test_vocabulary_order_is_specials_then_codebook(ids: SemanticIdMap) -> None:
    tok = build_tokenizer(ids)
    vocab = ids.vocabulary()
    assert len(tok) == NUM_SPECIAL + len(vocab)
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(NUM_SPECIAL))
    assert tok.convert_tokens_to_ids(vocab) == [NUM_SPECIAL + p for p in range(len(vocab))]
    for p, token in enumerate(vocab):  # offset + position, as SemanticIdMap says
        assert ids.token_id(token, offset=NUM_SPECIAL) == NUM_SPECIAL + p


def test_every_item_round_trips(ids: SemanticIdMap, tmp_path: Path) -> None:
    build_tokenizer(ids).save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)  # the saved form is what vLLM loads
    expected = ids.token_ids(np.arange(ids.num_items), NUM_SPECIAL)
    for item in range(ids.num_items):
        text = ids.to_tokens(item)
        encoded = tok.encode(text, add_special_tokens=False)
        assert encoded == expected[item].tolist()
        assert tok.decode(encoded) == text
        assert ids.parse(tok.decode(encoded)) == item


def test_pre_tokenizer_splits_glued_and_spaced_tokens(ids: SemanticIdMap) -> None:
    tok = build_tokenizer(ids)
    glued = tok.encode("<bos><user><a_1><b_2><sep>", add_special_tokens=False)
    spaced = tok.encode(" <bos> <user>  <a_1> <b_2>\n<sep> ", add_special_tokens=False)
    assert glued == spaced == [2, 5, ids.token_id("<a_1>", 6), ids.token_id("<b_2>", 6), 4]
    assert tok.encode("<zz_9>", add_special_tokens=False) == [tok.unk_token_id]


def test_special_ids_of_our_tokenizer(ids: SemanticIdMap) -> None:
    sp = special_ids(build_tokenizer(ids))
    assert (sp.pad, sp.bos, sp.eos, sp.sep, sp.user) == (0, 2, 3, 4, 5)


def _foreign_tokenizer(ids: SemanticIdMap, with_codebook: bool = True):
    """A word-level tokenizer of another model, extended the way the GPU recipe does."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "hello", "world", "movie"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
    )
    if with_codebook:
        tok.add_tokens(list(reversed(ids.vocabulary())))  # deliberately another order
        tok.add_tokens(["<user>", "<sep>"], special_tokens=True)
    return tok


def test_item_tokens_are_looked_up_not_assumed(ids: SemanticIdMap) -> None:
    tok = _foreign_tokenizer(ids)
    matrix = item_token_matrix(tok, ids)  # [I, L+1]
    assert matrix.shape == (ids.num_items, ids.num_levels)
    for item in range(ids.num_items):
        assert tok.convert_ids_to_tokens(matrix[item].tolist()) == ids.token_list(item)
    vocab = ItemVocab.from_tokenizer(tok, ids, max_history=4)
    assert vocab.specials.bos == 2 and vocab.specials.eos == 3
    assert vocab.prompt_ids([1])[:2] == [2, tok.convert_tokens_to_ids("<user>")]
    assert vocab.item_of(matrix[7].tolist()) == 7
    assert sorted(vocab.trie.allowed_next([])) == sorted(set(matrix[:, 0].tolist()))


def test_missing_codebook_tokens_are_named(ids: SemanticIdMap) -> None:
    with pytest.raises(ValidationError, match="lacks"):
        item_token_matrix(_foreign_tokenizer(ids, with_codebook=False), ids)


def test_prompt_layout_truncation_and_errors(ids: SemanticIdMap) -> None:
    vocab = ItemVocab.from_tokenizer(build_tokenizer(ids), ids, max_history=3)
    items = ids.token_ids(np.arange(ids.num_items), NUM_SPECIAL)
    assert vocab.prompt_ids([]) == [2, 5, 4]
    assert vocab.prompt_ids([7, 8]) == [2, 5, *items[7], *items[8], 4]
    assert vocab.prompt_ids([1, 2, 3, 4, 5]) == vocab.prompt_ids([3, 4, 5])  # most recent kept
    assert vocab.max_prompt_len() == 3 + 3 * ids.num_levels
    with pytest.raises(NotFoundError):
        vocab.prompt_ids([ids.num_items])
    with pytest.raises(NotFoundError):
        vocab.prompt_ids([-1])
    with pytest.raises(ValidationError):
        vocab.prompt_ids(["3"])
