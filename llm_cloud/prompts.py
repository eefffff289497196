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

**Item text (a pretrained LLM, :mod:`llm_cloud.align`).** A vocabulary built
:meth:`ItemVocab.with_item_text` also writes the item's own words before its ID for the
``text_items`` most recent items of the history::

    <bos> <user> ID(h_1) ... ID(h_{H-k}) TEXT(h_{H-k+1}) ID(h_{H-k+1}) ... TEXT(h_H) ID(h_H) <sep>

The length policy, fixed per model and saved with it (``recsys_lm.json``):

* at most ``max_history`` items (the most recent; older ones are dropped);
* text only for the ``text_items`` most recent of them (older items keep their ID: long
  taste through the codebook, recent intent through words);
* each item's text is its catalogue text (title, year, genres or brand, categories; see
  :data:`llm_cloud.align.PROMPT_TEXT_FIELDS`) cut to ``text_tokens`` tokens of the model's tokenizer
  ("<" and ">" become "(" and ")" first, so text can never spell a codebook token);

so every prompt has at most :meth:`ItemVocab.max_prompt_len` tokens, whatever the
history: an over-long history is truncated, never an error. Items without text
(TikTok) add no tokens.

Example::

    vocab = ItemVocab.from_tokenizer(tok, ids, max_history=20)
    vocab.prompt_ids([3, 17])        # [2, 5, <4 ids of item 3>, <4 ids of item 17>, 4]
    vocab.trie.allowed_next([])      # first tokens of valid IDs
    vocab.item_of(vocab.item_tokens[17].tolist())   # 17
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from llm_cloud.tokenizer import NUM_SPECIAL, SpecialIds, item_token_matrix, special_ids
from recsys.errors import NotFoundError, ValidationError

if TYPE_CHECKING:
    from codebook.semantic_ids import SemanticIdMap, SemanticIdTrie

logger = logging.getLogger(__name__)

DEFAULT_MAX_HISTORY = 20  # items; ml-100k users have ~100, recent ones matter most


def clean_item_text(text: str) -> str:
    """Item text safe inside a prompt: angle brackets become parentheses, so no text
    can spell a codebook or framing token (``<a_3>``, ``<sep>``)."""
    return " ".join(str(text).replace("<", "(").replace(">", ")").split())


def tokenize_texts(tok: Any, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Each text (cleaned) as at most ``max_tokens`` token ids of ``tok``, no specials."""
    if max_tokens <= 0 or not texts:
        return [[] for _ in texts]
    cleaned = [clean_item_text(t) for t in texts]
    encoded = tok(cleaned, add_special_tokens=False)["input_ids"]
    return [
        list(ids[:max_tokens]) if text else [] for ids, text in zip(encoded, cleaned, strict=True)
    ]


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
        item_text: per item, the token ids of its prompt text (<= ``text_tokens``), or
            None: IDs only (see the module docstring).
        text_items: how many of the most recent history items carry their text.
        text_tokens: longest text per item in tokens.
    """

    ids: SemanticIdMap
    item_tokens: np.ndarray
    specials: SpecialIds
    trie: SemanticIdTrie
    max_history: int
    vocab_size: int
    item_text: list[list[int]] | None = None
    text_items: int = 0
    text_tokens: int = 0

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

    def with_item_text(
        self, tok: Any, texts: Sequence[str], text_items: int, text_tokens: int
    ) -> ItemVocab:
        """This vocabulary with item text in its prompts (the length policy above).

        Args:
            tok: the model's tokenizer (the one ``item_tokens`` come from).
            texts: [I] one catalogue text per item ('' for none).
            text_items: most recent history items that carry text (0: none).
            text_tokens: longest text per item in tokens.
        """
        if len(texts) != self.num_items:
            raise ValidationError(f"{len(texts)} item texts for {self.num_items} items")
        if text_items < 0 or text_tokens < 0:
            raise ValidationError("text_items and text_tokens must be >= 0")
        item_text = tokenize_texts(tok, texts, text_tokens)
        return replace(
            self, item_text=item_text, text_items=int(text_items), text_tokens=int(text_tokens)
        )

    @property
    def has_text(self) -> bool:
        """Whether prompts carry item text (some item has text and text_items > 0)."""
        return bool(self.item_text) and self.text_items > 0 and any(self.item_text)

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

    def history_tokens(self, items: Sequence[int]) -> tuple[list[int], list[bool]]:
        """The prompt body of already-checked history items: (token ids, is-ID flags).

        Without text: the items' ID tokens. With text: the ``text_items`` most recent
        items' text tokens come right before their ID tokens; flags are False on text.
        """
        ids = self.item_tokens[list(items)].tolist() if len(items) else []
        if not self.has_text:
            flat = [t for row in ids for t in row]
            return flat, [True] * len(flat)
        first_text = len(items) - self.text_items
        tokens: list[int] = []
        flags: list[bool] = []
        for pos, (item, id_tokens) in enumerate(zip(items, ids, strict=True)):
            if pos >= first_text:
                text = self.item_text[int(item)]  # type: ignore[index]
                tokens += text
                flags += [False] * len(text)
            tokens += id_tokens
            flags += [True] * len(id_tokens)
        return tokens, flags

    def prompt_ids(self, history: Sequence[int]) -> list[int]:
        """Token ids of the prompt for ``history`` (validated, truncated): [T]."""
        body, _ = self.history_tokens(self.check_history(history))
        return [*self.prefix_ids(), *body, self.specials.sep]

    def prompt_text(self, history: Sequence[int], tok: Any) -> str:
        """The prompt as text (for logs and HTTP clients that send strings)."""
        return tok.decode(self.prompt_ids(history), skip_special_tokens=False)

    def max_prompt_len(self) -> int:
        """Longest prompt in tokens: framing + max_history IDs (+ the recent items' text)."""
        text = min(self.text_items, self.max_history) * self.text_tokens if self.has_text else 0
        return len(self.prefix_ids()) + 1 + self.max_history * self.depth + text

    def item_of(self, token_ids: Sequence[int]) -> int | None:
        """Item index of a complete ID's token ids, or None if they name no item."""
        return self.trie.item(token_ids)

    def trie_paths(self) -> list[list[int]]:
        """Every valid ID as a token-id list (the vLLM trie file's content), [I][L+1]."""
        return self.item_tokens.tolist()
