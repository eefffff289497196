"""Collision-free semantic IDs, their token vocabulary and the prefix trie for decoding.

Shapes: I items, L quantised levels, L+1 ID levels (the last one disambiguates),
N rows, V vocabulary size.

An item's semantic ID is its L residual codes plus a disambiguation code (TIGER): the
item's rank, by item index, among the items whose L codes are identical. So items with
a unique L-code prefix end in ``0``, and every item's ID is unique::

    codes [I, L+1]       item 7 -> (12, 7, 201, 0)
    tokens               "<a_12><b_7><c_201><d_0>"       level names a, b, c, d, ...

**Vocabulary (the contract with the LLM tokenizer).** :meth:`SemanticIdMap.vocabulary`
lists every token of every level, level by level, code by code::

    ["<a_0>", ..., "<a_{K_a-1}>", "<b_0>", ..., "<c_0>", ..., "<d_0>", ..., "<d_{K_d-1}>"]

``vocab_sizes`` = [K, K, K, K_d] (K_d = largest number of items sharing an L-code
prefix, at least 1). Token ``<x_c>`` of level l sits at position
``level_offsets[l] + c``. Unused codes keep their place, so the numbering depends on
K and K_d only. A tokenizer that puts S special tokens first uses ``offset=S``
everywhere a method takes token ids.

**Trie.** :meth:`SemanticIdMap.trie` (or :meth:`allowed_next`) answers, for a prefix
of token ids of one ID being generated, which token ids may come next: a dict lookup
of the prefix tuple (built once, O(I * (L+1)) entries), so it can be called for every
sequence of a batch at every decoding step.

Example::

    ids = SemanticIdMap.from_codes(codes, codes_per_level=256)   # codes int64 [I, 3]
    ids.to_tokens(7)                    # '<a_12><b_7><c_201><d_0>'
    ids.parse("<a_12><b_7><c_201><d_0>")  # 7
    vocab = ids.vocabulary()            # list[str], len == sum(ids.vocab_sizes)
    trie = ids.trie(offset=3)           # token ids shifted past 3 special tokens
    trie.allowed_next([])               # ids of the first-level tokens in use
    trie.allowed_next(ids.token_ids([7], offset=3)[0, :2].tolist())   # valid 3rd tokens
    ids.save(out_dir); SemanticIdMap.load(out_dir)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recsys.errors import DataFormatError, NotFoundError, ValidationError

logger = logging.getLogger(__name__)

LEVEL_NAMES = "abcdefghijklmnopqrstuvwxyz"
CODES_FILE = "semantic_ids.npy"
META_FILE = "semantic_ids.json"
FORMAT_VERSION = 1
_TOKEN = re.compile(r"<([a-z])_(0|[1-9][0-9]*)>")
_ID = re.compile(r"(?:<[a-z]_[0-9]+>)+")


def disambiguate(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Append the disambiguation level: rank by item index within each identical L-code row.

    Args:
        codes: int [I, L].

    Returns:
        (ids int64 [I, L+1], group_sizes int64 [I]: items sharing each item's L codes).
    """
    codes = np.asarray(codes, dtype=np.int64)
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")  # items grouped by prefix, by index inside
    starts = np.zeros(len(counts), dtype=np.int64)
    starts[1:] = np.cumsum(counts)[:-1]
    rank = np.empty(len(codes), dtype=np.int64)
    rank[order] = np.arange(len(codes)) - starts[inverse[order]]
    return np.concatenate([codes, rank[:, None]], axis=1), counts[inverse].astype(np.int64)


def collision_stats(codes: np.ndarray) -> dict[str, Any]:
    """How often items share their L codes (before disambiguation).

    Args:
        codes: int [I, L].

    Returns:
        dict: items, unique_prefixes, collision_rate (1 - unique/items: the share of
        items that need a non-zero disambiguation code), colliding_items (share of items
        in a group of 2+), max_per_prefix (largest group), colliding_groups.
    """
    codes = np.asarray(codes, dtype=np.int64)
    _, counts = np.unique(codes, axis=0, return_counts=True)
    items = len(codes)
    return {
        "items": items,
        "unique_prefixes": len(counts),
        "collision_rate": 1.0 - len(counts) / items if items else 0.0,
        "colliding_items": float(counts[counts > 1].sum() / items) if items else 0.0,
        "colliding_groups": int((counts > 1).sum()),
        "max_per_prefix": int(counts.max()) if items else 0,
    }


class SemanticIdTrie:
    """Valid continuations of partial semantic IDs, over absolute token ids.

    Built by :meth:`SemanticIdMap.trie`. A prefix is a sequence of token ids (already
    shifted by ``offset``) of the ID being generated, of length 0..depth.

    Attributes:
        offset: the token id of vocabulary position 0.
        depth: L+1, tokens per complete ID.

    Example::

        trie = ids.trie(offset=0)
        trie.allowed_next([])                       # all first tokens in use
        trie.allowed_next_batch([[], [5]])          # one list per sequence
        trie.allowed_mask([[], [5]], vocab_size)    # bool [2, V]
    """

    def __init__(self, token_ids: np.ndarray, offset: int) -> None:
        """token_ids: int64 [I, L+1] absolute token ids of every item."""
        self.offset = int(offset)
        self.depth = int(token_ids.shape[1])
        self._next: dict[tuple[int, ...], list[int]] = {}
        self._item: dict[tuple[int, ...], int] = {}
        for p in range(self.depth):
            rows = np.unique(token_ids[:, : p + 1], axis=0)  # sorted lexicographically
            for row in rows.tolist():
                self._next.setdefault(tuple(row[:-1]), []).append(row[-1])
        for item, row in enumerate(token_ids.tolist()):
            self._item[tuple(row)] = item

    def __len__(self) -> int:
        """Number of incomplete prefixes (internal nodes)."""
        return len(self._next)

    def allowed_next(self, prefix: Sequence[int]) -> list[int]:
        """Token ids that may follow ``prefix`` (ascending; a fresh list).

        Returns an empty list when ``prefix`` is a complete ID (the caller then allows
        its own end/separator token) or is not the start of any valid ID.
        """
        found = self._next.get(tuple(int(t) for t in prefix))
        return list(found) if found is not None else []

    def allowed_next_batch(self, prefixes: Iterable[Sequence[int]]) -> list[list[int]]:
        """:meth:`allowed_next` for each prefix of a batch."""
        return [self.allowed_next(p) for p in prefixes]

    def allowed_mask(self, prefixes: Sequence[Sequence[int]], vocab_size: int) -> np.ndarray:
        """bool [B, V]: True where a token may follow each prefix (for logits masking)."""
        mask = np.zeros((len(prefixes), vocab_size), dtype=bool)
        for row, prefix in enumerate(prefixes):
            found = self._next.get(tuple(int(t) for t in prefix))
            if found:
                mask[row, found] = True
        return mask

    def is_complete(self, prefix: Sequence[int]) -> bool:
        """Whether ``prefix`` is a whole valid ID."""
        return tuple(int(t) for t in prefix) in self._item

    def item(self, token_ids: Sequence[int]) -> int | None:
        """The item index of a complete ID, or None."""
        return self._item.get(tuple(int(t) for t in token_ids))


class SemanticIdMap:
    """Items <-> collision-free semantic IDs <-> tokens.

    Args:
        codes: int64 [I, L+1], unique rows; column l in [0, vocab_sizes[l]).
        vocab_sizes: codes per level, length L+1 (last = disambiguation level).
        item_ids: optional [I] dataset item ids (str), for :meth:`item_index`.

    Attributes:
        codes: int64 [I, L+1].
        vocab_sizes: list[int], length L+1.
        level_names: ["a", "b", ...], length L+1.
        level_offsets: vocabulary position of each level's code 0, length L+1.
        item_ids: [I] object array or None.
        collisions: :func:`collision_stats` of the first L levels.
    """

    def __init__(
        self, codes: Any, vocab_sizes: Sequence[int], item_ids: Sequence[str] | None = None
    ) -> None:
        arr = np.asarray(codes)
        if arr.ndim != 2 or arr.shape[1] < 2 or not np.issubdtype(arr.dtype, np.integer):
            raise ValidationError(
                f"codes: expected an integer matrix [I, L+1>=2], got {arr.dtype} {arr.shape}"
            )
        arr = np.ascontiguousarray(arr, dtype=np.int64)
        sizes = [int(v) for v in vocab_sizes]
        if len(sizes) != arr.shape[1]:
            raise ValidationError(f"vocab_sizes has {len(sizes)} entries for {arr.shape[1]} levels")
        if len(sizes) > len(LEVEL_NAMES):
            raise ValidationError(f"at most {len(LEVEL_NAMES)} levels (a..z), got {len(sizes)}")
        if any(v < 1 for v in sizes):
            raise ValidationError(f"vocab_sizes must be >= 1, got {sizes}")
        if len(arr):
            low, high = arr.min(axis=0), arr.max(axis=0)
            bad = [lv for lv in range(len(sizes)) if low[lv] < 0 or high[lv] >= sizes[lv]]
            if bad:
                lv = bad[0]
                raise ValidationError(
                    f"level {LEVEL_NAMES[lv]}: codes span [{low[lv]}, {high[lv]}], "
                    f"outside [0, {sizes[lv]})"
                )
        self.codes = arr
        self.vocab_sizes = sizes
        self.level_names = list(LEVEL_NAMES[: len(sizes)])
        self.level_offsets = [int(v) for v in np.concatenate([[0], np.cumsum(sizes)[:-1]])]
        self._lookup: dict[tuple[int, ...], int] = {}
        for item, row in enumerate(arr.tolist()):
            other = self._lookup.setdefault(tuple(row), item)
            if other != item:
                raise ValidationError(
                    f"items {other} and {item} share the semantic ID {self._render(row)}; "
                    "build the map with SemanticIdMap.from_codes to disambiguate"
                )
        self.collisions = collision_stats(arr[:, :-1])
        if item_ids is not None:
            ids = np.asarray(item_ids, dtype=object)
            if ids.shape != (len(arr),):
                raise ValidationError(f"item_ids: expected [{len(arr)}], got {ids.shape}")
            self.item_ids: np.ndarray | None = ids
            self._item_index = {str(v): i for i, v in enumerate(ids)}
        else:
            self.item_ids = None
            self._item_index = {}
        self._tries: dict[int, SemanticIdTrie] = {}

    @classmethod
    def from_codes(
        cls,
        codes: Any,
        codes_per_level: int | Sequence[int],
        item_ids: Sequence[str] | None = None,
    ) -> SemanticIdMap:
        """Quantiser codes int [I, L] -> a map with the disambiguation level appended.

        Args:
            codes: int [I, L] residual codes.
            codes_per_level: K (same for every level) or one K per level.
            item_ids: optional [I] dataset item ids.
        """
        arr = np.asarray(codes)
        if arr.ndim != 2 or arr.shape[0] == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise ValidationError(
                f"codes: expected a non-empty integer matrix [I, L], got {arr.dtype} {arr.shape}"
            )
        ks = (
            [int(codes_per_level)] * arr.shape[1]
            if np.isscalar(codes_per_level)
            else list(codes_per_level)
        )
        full, sizes = disambiguate(arr)
        stats = collision_stats(arr)
        logger.info(
            "semantic IDs: %d items, %d unique %d-code prefixes (collision rate %.4f, largest group %d)",
            stats["items"], stats["unique_prefixes"], arr.shape[1], stats["collision_rate"],
            stats["max_per_prefix"],
        )  # fmt: skip
        return cls(full, [*ks, int(sizes.max())], item_ids=item_ids)

    # ---- sizes -------------------------------------------------------------------------
    @property
    def num_items(self) -> int:
        return int(self.codes.shape[0])

    @property
    def num_levels(self) -> int:
        """L+1: tokens per semantic ID."""
        return int(self.codes.shape[1])

    @property
    def quantised_levels(self) -> int:
        """L: levels that come from the quantiser."""
        return self.num_levels - 1

    @property
    def vocab_size(self) -> int:
        """V = sum(vocab_sizes)."""
        return int(sum(self.vocab_sizes))

    # ---- vocabulary --------------------------------------------------------------------
    def vocabulary(self) -> list[str]:
        """Every token in vocabulary order: level a codes 0..K_a-1, then level b, ..."""
        return [
            f"<{name}_{code}>"
            for name, size in zip(self.level_names, self.vocab_sizes, strict=True)
            for code in range(size)
        ]

    def token_id(self, token: str, offset: int = 0) -> int:
        """``"<b_7>"`` -> its vocabulary position + offset; ValidationError if not a token."""
        level, code = self._parse_token(token)
        return offset + self.level_offsets[level] + code

    def token(self, token_id: int, offset: int = 0) -> str:
        """Vocabulary position + offset -> token string; ValidationError if out of range."""
        pos = int(token_id) - offset
        if not 0 <= pos < self.vocab_size:
            raise ValidationError(
                f"token id {token_id} is outside the codebook vocabulary "
                f"[{offset}, {offset + self.vocab_size})"
            )
        level = int(np.searchsorted(self.level_offsets, pos, side="right")) - 1
        return f"<{self.level_names[level]}_{pos - self.level_offsets[level]}>"

    # ---- items -> tokens ---------------------------------------------------------------
    def _check_item(self, item: int) -> int:
        if isinstance(item, bool) or not isinstance(item, int | np.integer):
            raise ValidationError(f"item index must be an integer, got {item!r}")
        if not 0 <= int(item) < self.num_items:
            raise NotFoundError(f"item index {item} is outside [0, {self.num_items})")
        return int(item)

    def _render(self, row: Iterable[int]) -> str:
        return "".join(f"<{n}_{int(c)}>" for n, c in zip(self.level_names, row, strict=True))

    def to_tokens(self, item: int) -> str:
        """Item index -> ``"<a_12><b_7><c_201><d_0>"``."""
        return self._render(self.codes[self._check_item(item)])

    def token_list(self, item: int) -> list[str]:
        """Item index -> ``["<a_12>", "<b_7>", "<c_201>", "<d_0>"]``."""
        row = self.codes[self._check_item(item)]
        return [f"<{n}_{int(c)}>" for n, c in zip(self.level_names, row, strict=True)]

    def token_ids(self, items: Any, offset: int = 0) -> np.ndarray:
        """Item indices int [N] -> token ids int64 [N, L+1] (vocabulary position + offset)."""
        idx = np.asarray(items, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.num_items):
            raise NotFoundError(f"item indices must lie in [0, {self.num_items})")
        return self.codes[idx] + np.asarray(self.level_offsets, dtype=np.int64) + int(offset)

    # ---- tokens -> items ---------------------------------------------------------------
    def _parse_token(self, token: str) -> tuple[int, int]:
        match = _TOKEN.fullmatch(token.strip()) if isinstance(token, str) else None
        if match is None:
            raise ValidationError(f"{token!r} is not a codebook token like '<a_12>'")
        name, code = match.group(1), int(match.group(2))
        if name not in self.level_names:
            raise ValidationError(
                f"{token!r}: level {name!r} does not exist (levels {''.join(self.level_names)})"
            )
        level = self.level_names.index(name)
        if code >= self.vocab_sizes[level]:
            raise ValidationError(
                f"{token!r}: code {code} is outside [0, {self.vocab_sizes[level]}) of level {name}"
            )
        return level, code

    def parse_tokens(self, tokens: Sequence[str]) -> int:
        """``["<a_12>", "<b_7>", "<c_201>", "<d_0>"]`` -> item index.

        Raises:
            ValidationError: wrong number of tokens, a malformed token, levels out of
                order, or a code outside its level's range.
            NotFoundError: well-formed, but no item has this ID.
        """
        expected = "".join(f"<{n}_*>" for n in self.level_names)
        if len(tokens) != self.num_levels:
            raise ValidationError(
                f"{''.join(map(str, tokens))!r}: a semantic ID has {self.num_levels} tokens "
                f"{expected}, got {len(tokens)}"
            )
        codes = []
        for position, token in enumerate(tokens):
            level, code = self._parse_token(token)
            if level != position:
                raise ValidationError(
                    f"{''.join(tokens)!r}: token {position + 1} should be of level "
                    f"{self.level_names[position]!r}, got {token!r} (expected {expected})"
                )
            codes.append(code)
        item = self._lookup.get(tuple(codes))
        if item is None:
            raise NotFoundError(f"semantic ID {''.join(tokens)} is well-formed but names no item")
        return item

    def parse(self, text: str) -> int:
        """``"<a_12><b_7><c_201><d_0>"`` -> item index (surrounding whitespace allowed).

        Raises:
            ValidationError: not a sequence of tokens, or see :meth:`parse_tokens`.
            NotFoundError: well-formed, but no item has this ID.
        """
        if not isinstance(text, str):
            raise ValidationError(
                f"a semantic ID is a string like '<a_12><b_7>...', got {type(text).__name__}"
            )
        stripped = text.strip()
        if not _ID.fullmatch(stripped):
            raise ValidationError(
                f"{text!r} is not a semantic ID; expected {len(self.level_names)} tokens like "
                f"{self._render(self.codes[0]) if self.num_items else '<a_0><b_0>'}"
            )
        return self.parse_tokens(re.findall(r"<[^<>]*>", stripped))

    def lookup(self, codes: Sequence[int]) -> int:
        """Codes (L+1 integers) -> item index, or NotFoundError."""
        item = self._lookup.get(tuple(int(c) for c in codes))
        if item is None:
            raise NotFoundError(f"no item has the semantic codes {tuple(codes)}")
        return item

    def items_of_token_ids(self, token_ids: Any, offset: int = 0) -> np.ndarray:
        """Token ids int [N, L+1] -> item indices int64 [N]; -1 where a row names no item."""
        arr = np.asarray(token_ids, dtype=np.int64)
        if arr.ndim != 2 or arr.shape[1] != self.num_levels:
            raise ValidationError(f"token_ids: expected [N, {self.num_levels}], got {arr.shape}")
        codes = arr - np.asarray(self.level_offsets, dtype=np.int64) - int(offset)
        return np.asarray(
            [self._lookup.get(tuple(row), -1) for row in codes.tolist()], dtype=np.int64
        )

    def item_index(self, item_id: str) -> int:
        """Dataset item id -> item index (needs ``item_ids``)."""
        if self.item_ids is None:
            raise ValidationError("this map has no item ids; build it with item_ids=...")
        try:
            return self._item_index[str(item_id)]
        except KeyError:
            raise NotFoundError(f"unknown item id {item_id!r}") from None

    # ---- constrained decoding ----------------------------------------------------------
    def trie(self, offset: int = 0) -> SemanticIdTrie:
        """The prefix trie over token ids shifted by ``offset`` (built once per offset)."""
        offset = int(offset)
        if offset not in self._tries:
            self._tries[offset] = SemanticIdTrie(
                self.token_ids(np.arange(self.num_items), offset), offset
            )
        return self._tries[offset]

    def allowed_next(self, prefix_token_ids: Sequence[int], offset: int = 0) -> list[int]:
        """Token ids that may follow a partial ID (see :meth:`SemanticIdTrie.allowed_next`)."""
        return self.trie(offset).allowed_next(prefix_token_ids)

    # ---- persistence -------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``semantic_ids.npy`` (int64 [I, L+1]) and ``semantic_ids.json``."""
        from codebook.io import atomic_write, write_json

        out = Path(directory)
        atomic_write(out / CODES_FILE, lambda fh: np.save(fh, self.codes))
        write_json(
            out / META_FILE,
            {
                "format_version": FORMAT_VERSION,
                "num_items": self.num_items,
                "level_names": self.level_names,
                "vocab_sizes": self.vocab_sizes,
                "vocab_size": self.vocab_size,
                "token_format": "<{level}_{code}>",
                "collisions": self.collisions,
                "item_ids": None if self.item_ids is None else [str(v) for v in self.item_ids],
            },
        )
        return out

    @classmethod
    def load(cls, directory: str | Path) -> SemanticIdMap:
        """Read what :meth:`save` wrote; a DataFormatError names a missing or bad file."""
        from codebook.io import read_json

        root = Path(directory)
        meta = read_json(
            root / META_FILE,
            "train a codebook first (`recsys train codebook`)",
            version=FORMAT_VERSION,
        )
        try:
            codes = np.load(root / CODES_FILE, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataFormatError(
                root / CODES_FILE, None, f"unreadable ({exc}); retrain the codebook"
            ) from None
        try:
            return cls(codes, meta["vocab_sizes"], item_ids=meta.get("item_ids"))
        except (KeyError, ValidationError) as exc:
            raise DataFormatError(
                root / META_FILE, None, f"inconsistent semantic IDs ({exc})"
            ) from None
