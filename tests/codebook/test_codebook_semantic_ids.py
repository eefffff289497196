"""Semantic IDs: disambiguation, tokens, parsing, vocabulary order, the trie, persistence."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codebook.semantic_ids import SemanticIdMap, collision_stats, disambiguate
from recsys.errors import DataFormatError, NotFoundError, ValidationError

# 6 items, L=2, K=3; items 0, 2, 5 share (1, 2) and items 1, 4 share (0, 0)
CODES = np.array([[1, 2], [0, 0], [1, 2], [2, 1], [0, 0], [1, 2]])


@pytest.fixture
def ids() -> SemanticIdMap:
    return SemanticIdMap.from_codes(CODES, 3, item_ids=[f"m{i}" for i in range(6)])


def test_disambiguation_ranks_by_item_index(ids) -> None:
    assert ids.codes[:, 2].tolist() == [0, 0, 1, 0, 1, 2]
    assert ids.vocab_sizes == [3, 3, 3]  # last level: largest group (3)
    assert len({tuple(r) for r in ids.codes.tolist()}) == 6
    stats = collision_stats(CODES)
    assert stats["unique_prefixes"] == 3
    assert stats["collision_rate"] == pytest.approx(0.5)
    assert stats["colliding_items"] == pytest.approx(5 / 6)
    assert stats["max_per_prefix"] == 3 and stats["colliding_groups"] == 2
    assert ids.collisions == stats


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 2), min_size=2, max_size=2), min_size=1, max_size=40),
)
def test_final_ids_are_always_unique(rows) -> None:
    full, sizes = disambiguate(np.array(rows))
    assert len(np.unique(full, axis=0)) == len(rows)
    assert (full[:, -1] < sizes).all()


def test_tokens_round_trip(ids) -> None:
    assert ids.to_tokens(2) == "<a_1><b_2><c_1>"
    assert ids.token_list(2) == ["<a_1>", "<b_2>", "<c_1>"]
    for item in range(ids.num_items):
        assert ids.parse(ids.to_tokens(item)) == item
        assert ids.parse_tokens(ids.token_list(item)) == item
        assert ids.lookup(ids.codes[item]) == item
    assert ids.parse("  <a_1><b_2><c_1>\n") == 2
    assert ids.item_index("m3") == 3


def test_vocabulary_order_and_token_ids(ids) -> None:
    vocab = ids.vocabulary()
    assert vocab == [f"<{lv}_{c}>" for lv in "abc" for c in range(3)]
    assert ids.level_offsets == [0, 3, 6] and ids.vocab_size == 9
    for offset in (0, 5):
        rows = ids.token_ids(np.arange(6), offset=offset)  # [6, 3]
        assert rows.shape == (6, 3)
        for item, row in enumerate(rows.tolist()):
            assert [vocab[t - offset] for t in row] == ids.token_list(item)
            assert [ids.token(t, offset) for t in row] == ids.token_list(item)
            assert [ids.token_id(tok, offset) for tok in ids.token_list(item)] == row
        assert ids.items_of_token_ids(rows, offset).tolist() == list(range(6))
    bad = ids.token_ids([3])  # (2, 1, 0)
    bad[0, 2] = 7  # <c_1>: no item has (2, 1, 1)
    assert ids.items_of_token_ids(bad).tolist() == [-1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not a semantic ID"),
        ("a_1 b_2 c_1", "not a semantic ID"),
        ("<a_1><b_2>", "has 3 tokens"),
        ("<a_1><b_2><c_1><d_0>", "has 3 tokens"),
        ("<a_1><c_2><b_1>", "should be of level 'b'"),
        ("<a_1><b_7><c_0>", r"outside \[0, 3\)"),
        ("<a_01><b_2><c_1>", "not a codebook token"),
        ("<z_1><b_2><c_1>", "does not exist"),
        ("<a_1><b_2><c_1>x", "not a semantic ID"),
    ],
)
def test_parse_rejects_invalid_ids(ids, text, message) -> None:
    with pytest.raises(ValidationError, match=message):
        ids.parse(text)


def test_parse_well_formed_but_unknown(ids) -> None:
    with pytest.raises(NotFoundError, match="names no item"):
        ids.parse("<a_2><b_2><c_2>")
    with pytest.raises(NotFoundError):
        ids.to_tokens(6)
    with pytest.raises(NotFoundError):
        ids.item_index("nope")
    with pytest.raises(ValidationError):
        ids.token(99)


def test_trie_allows_exactly_the_valid_continuations(ids) -> None:
    offset = 4
    trie = ids.trie(offset)
    valid = [tuple(r) for r in ids.token_ids(np.arange(6), offset).tolist()]
    vocab_ids = range(offset, offset + ids.vocab_size)
    for depth in range(ids.num_levels + 1):
        # every prefix of a valid ID, and some invalid ones built from any vocab tokens
        candidates = {v[:depth] for v in valid}
        if depth <= 2:
            candidates |= set(itertools.product(vocab_ids, repeat=depth))
        for prefix in candidates:
            expected = sorted({v[depth] for v in valid if v[:depth] == prefix}) if depth < 3 else []
            assert trie.allowed_next(list(prefix)) == expected, prefix
    assert trie.allowed_next([]) == [offset + 0, offset + 1, offset + 2]
    first = valid[0]
    assert trie.is_complete(first) and trie.item(first) == 0
    assert not trie.is_complete(first[:2]) and trie.item(first[:2]) is None
    assert ids.allowed_next(list(first[:2]), offset) == trie.allowed_next(list(first[:2]))


def test_trie_batch_helpers(ids) -> None:
    trie = ids.trie(0)
    prefixes = [[], [1], [1, 5], [2, 5]]  # [2, 5] = <a_2><b_2>: no item
    lists = trie.allowed_next_batch(prefixes)
    assert lists == [trie.allowed_next(p) for p in prefixes]
    mask = trie.allowed_mask(prefixes, vocab_size=12)
    assert mask.shape == (4, 12)
    for row, allowed in zip(mask, lists, strict=True):
        assert np.flatnonzero(row).tolist() == allowed
    returned = trie.allowed_next([])
    returned.append(99)  # callers get a copy
    assert 99 not in trie.allowed_next([])


def test_save_load_round_trip(ids, tmp_path: Path) -> None:
    ids.save(tmp_path)
    back = SemanticIdMap.load(tmp_path)
    assert np.array_equal(back.codes, ids.codes)
    assert back.vocab_sizes == ids.vocab_sizes and back.vocabulary() == ids.vocabulary()
    assert back.item_ids.tolist() == ids.item_ids.tolist()
    assert back.collisions == ids.collisions


def test_load_and_constructor_errors(ids, tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="missing"):
        SemanticIdMap.load(tmp_path)
    with pytest.raises(ValidationError, match="share the semantic ID"):
        SemanticIdMap(np.array([[0, 0], [0, 0]]), [1, 1])
    with pytest.raises(ValidationError, match="outside"):
        SemanticIdMap(np.array([[0, 3]]), [1, 2])
    with pytest.raises(ValidationError, match="vocab_sizes"):
        SemanticIdMap(np.array([[0, 0]]), [1, 1, 1])
