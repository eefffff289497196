"""Prompts from user histories, and the valid-ID trie, over one model's token ids.

Shapes: I items, L+1 tokens per semantic ID (``depth``), H history length (items),
T prompt length (tokens).

The prompt of a history [h_1 .. h_H] (item indices, oldest first) is, as token ids::

    <bos> <user> ID(h_1) ... ID(h_H) <sep>          T = 3 + H * (L+1)   (no <bos>: T - 1)

and the model answers ``ID(next) <eos>``. Histories longer than ``max_history`` keep
their most recent ``max_history`` items; an empty history gives ``<bos> <user> <sep>``,
for which the LM's answer is its learned prior over first items (a popularity-like
ranking). The same layout, with the history items also predicted left to right, is
what :mod:`llm_cloud.lm_train` trains on.

Example::

    vocab = ItemVocab.from_tokenizer(tok, ids, max_history=20)
    vocab.prompt_ids([3, 17])        # [2, 5, <4 ids of item 3>, <4 ids of item 17>, 4]
    vocab.trie.allowed_next([])      # first tokens of valid IDs
    vocab.item_of(vocab.item_tokens[17].tolist())   # 17
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from llm_cloud.tokenizer import NUM_SPECIAL, SpecialIds, item_token_matrix, special_ids
from recsys.errors import NotFoundError, ValidationError

if TYPE_CHECKING:
    from codebook.semantic_ids import SemanticIdMap, SemanticIdTrie

logger = logging.getLogger(__name__)

DEFAULT_MAX_HISTORY = 20  # items; ml-100k users have ~100, recent ones matter most


@dataclass
class ItemVocab:
    """Item <-> token-id mapping of one model, its framing tokens and the ID trie.

    Attributes:
        ids: the items' semantic IDs.
        item_tokens: int64 [I, L+1] token ids of each item's ID in this model's tokenizer.
        specials: ids of <bos>/<user>/<sep>/<eos>/<pad>.
        trie: valid continuations over these token ids.
        max_history: items kept from the end of a longer history.
        vocab_size: the tokenizer's size (for logits masks), >= max token id + 1.
    """

    ids: SemanticIdMap
    item_tokens: np.ndarray
    specials: SpecialIds
    trie: SemanticIdTrie
    max_history: int
    vocab_size: int

    @classmethod
    def from_tokenizer(
        cls, tok: Any, ids: SemanticIdMap, max_history: int = DEFAULT_MAX_HISTORY
    ) -> ItemVocab:
        """Look every codebook token up in ``tok`` (works for any HF tokenizer)."""
        from codebook.semantic_ids import SemanticIdTrie

        if max_history < 0:
            raise ValidationError(f"max_history must be >= 0, got {max_history}")
        item_tokens = item_token_matrix(tok, ids)  # [I, L+1]
        ours = np.array_equal(item_tokens, ids.token_ids(np.arange(ids.num_items), NUM_SPECIAL))
        # our layout: reuse the map's cached trie; otherwise build one over looked-up ids
        trie = ids.trie(NUM_SPECIAL) if ours else SemanticIdTrie(item_tokens, offset=0)
        return cls(
            ids=ids,
            item_tokens=item_tokens,
            specials=special_ids(tok),
            trie=trie,
            max_history=int(max_history),
            vocab_size=len(tok),
        )

    @property
    def num_items(self) -> int:
        return int(self.item_tokens.shape[0])

    @property
    def depth(self) -> int:
        """L+1: tokens per semantic ID (decoding steps per answer)."""
        return int(self.item_tokens.shape[1])

    def check_history(self, history: Sequence[int]) -> list[int]:
        """Validate item indices and keep the most recent ``max_history``.

        Raises:
            ValidationError: an entry is not an integer.
            NotFoundError: an index is outside [0, I).
        """
        out: list[int] = []
        for item in history:
            if isinstance(item, bool) or not isinstance(item, int | np.integer):
                raise ValidationError(f"history items must be integer item indices, got {item!r}")
            if not 0 <= int(item) < self.num_items:
                raise NotFoundError(
                    f"item index {item} is outside the catalogue [0, {self.num_items})"
                )
            out.append(int(item))
        if self.max_history == 0:
            return []
        return out[-self.max_history :]

    def prefix_ids(self) -> list[int]:
        """The tokens before the first history item: ``[<bos>, <user>]`` (no bos if None)."""
        sp = self.specials
        return [sp.user] if sp.bos is None else [sp.bos, sp.user]

    def prompt_ids(self, history: Sequence[int]) -> list[int]:
        """Token ids of the prompt for ``history`` (validated, truncated): [T]."""
        items = self.check_history(history)
        body = self.item_tokens[items].reshape(-1).tolist() if items else []
        return [*self.prefix_ids(), *body, self.specials.sep]

    def prompt_text(self, history: Sequence[int], tok: Any) -> str:
        """The prompt as text (for logs and HTTP clients that send strings)."""
        return tok.decode(self.prompt_ids(history), skip_special_tokens=False)

    def max_prompt_len(self) -> int:
        """Longest prompt in tokens: framing + max_history IDs."""
        return len(self.prefix_ids()) + 1 + self.max_history * self.depth

    def item_of(self, token_ids: Sequence[int]) -> int | None:
        """Item index of a complete ID's token ids, or None if they name no item."""
        return self.trie.item(token_ids)

    def trie_paths(self) -> list[list[int]]:
        """Every valid ID as a token-id list (the vLLM trie file's content), [I][L+1]."""
        return self.item_tokens.tolist()
