"""The codebook LM's tokenizer, and item-token lookup in any Hugging Face tokenizer.

Shapes: I items, L+1 tokens per semantic ID, V vocabulary size, S special tokens.

**Our tokenizer** (:func:`build_tokenizer`) is built locally with ``tokenizers``: the
special tokens :data:`SPECIAL_TOKENS` first, then *exactly*
:meth:`codebook.SemanticIdMap.vocabulary` in order, so the token id of vocabulary
position p is ``S + p`` (``offset=S`` in every ``SemanticIdMap`` method)::

    0 <pad>  1 <unk>  2 <bos>  3 <eos>  4 <sep>  5 <user>  6 <a_0>  7 <a_1> ...

A WordLevel model, a pre-tokenizer that cuts ``"<a_12><b_7>"`` into ``<a_12>``,
``<b_7>`` (whitespace between tokens is ignored) and a ``Fuse`` decoder (decoding gives
``"<a_12><b_7>"`` back, no spaces). Wrapped as ``PreTrainedTokenizerFast`` and saved
with ``save_pretrained`` beside the model, so vLLM loads it unchanged. No BOS/EOS is
added automatically: prompts are built as token ids by :mod:`llm_cloud.prompts`.

**Any tokenizer** (:func:`item_token_matrix`): for a model that is not ours (e.g. a
pretrained LLM whose vocabulary was extended with the codebook tokens, see
:mod:`llm_cloud.lm_train`), the item tokens' ids are looked up by string, never
assumed to sit at ``offset + position``.

Example::

    ids = SemanticIdMap.load(codebook_dir)
    tok = build_tokenizer(ids)
    tok.convert_tokens_to_ids("<a_0>")          # 6 == NUM_SPECIAL + 0
    tok.encode(ids.to_tokens(7))                # [6 + .., .., .., ..] (L+1 ids)
    tok.decode(tok.encode(ids.to_tokens(7)))    # '<a_12><b_7><c_201><d_0>'
    item_token_matrix(tok, ids)                 # int64 [I, L+1] == ids.token_ids(range(I), 6)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from recsys.errors import ValidationError

if TYPE_CHECKING:
    from codebook.semantic_ids import SemanticIdMap

logger = logging.getLogger(__name__)

PAD, UNK, BOS, EOS, SEP, USER = "<pad>", "<unk>", "<bos>", "<eos>", "<sep>", "<user>"
# Order fixes the ids 0..S-1 of our tokenizer; append new specials at the end only.
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS, SEP, USER)
NUM_SPECIAL = len(SPECIAL_TOKENS)
TOKEN_PATTERN = r"<[^<>]*>"  # one codebook or special token


def build_tokenizer(ids: SemanticIdMap, model_max_length: int = 512) -> Any:
    """A ``PreTrainedTokenizerFast`` over :data:`SPECIAL_TOKENS` + ``ids.vocabulary()``.

    Args:
        ids: the items' semantic IDs (their vocabulary fixes the token order).
        model_max_length: longest sequence the model takes (saved in the tokenizer).

    Returns:
        The tokenizer; ``len(tok) == NUM_SPECIAL + ids.vocab_size``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = [*SPECIAL_TOKENS, *ids.vocabulary()]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValidationError("the codebook vocabulary repeats a token or a special token")
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(TOKEN_PATTERN), behavior="isolated"),
        ]
    )
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        sep_token=SEP,
        additional_special_tokens=[USER],
        model_max_length=model_max_length,
        padding_side="left",  # prompts are left-padded for batched generation
    )
    if len(tok) != len(tokens) or tok.convert_tokens_to_ids(tokens[-1]) != len(tokens) - 1:
        raise ValidationError("tokenizer vocabulary order differs from the codebook vocabulary")
    return tok


def load_tokenizer(model_dir: Any) -> Any:
    """``AutoTokenizer.from_pretrained(model_dir)`` (fast tokenizer, local files only)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


@dataclass(frozen=True)
class SpecialIds:
    """Token ids of the prompt's framing tokens in one tokenizer.

    Attributes:
        bos: id of the start token, or None if the tokenizer has none (then omitted).
        user: id of ``<user>`` (opens the history).
        sep: id of ``<sep>`` (closes the history; the answer follows).
        eos: id of the end token (ends the answer).
        pad: id used for left padding (the pad token, else eos).
    """

    bos: int | None
    user: int
    sep: int
    eos: int
    pad: int


def special_ids(tok: Any) -> SpecialIds:
    """The framing tokens' ids in ``tok``; ValidationError names a missing one.

    ``<user>`` and ``<sep>`` are looked up by string; BOS/EOS/PAD are the tokenizer's
    own (for our tokenizer ``<bos>``/``<eos>``/``<pad>``; for an extended pretrained LLM
    its native ones).
    """
    unk = tok.unk_token_id

    def lookup(token: str) -> int:
        tid = tok.convert_tokens_to_ids(token)
        if tid is None or (unk is not None and tid == unk and token != tok.unk_token):
            raise ValidationError(
                f"the tokenizer has no {token!r} token; add it (tokenizer.add_tokens([{token!r}], "
                "special_tokens=True)) and resize the model's embeddings"
            )
        return int(tid)

    eos = tok.eos_token_id
    if eos is None:
        raise ValidationError("the tokenizer has no EOS token; set tokenizer.eos_token")
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    bos = tok.bos_token_id
    return SpecialIds(
        bos=None if bos is None else int(bos),
        user=lookup(USER),
        sep=lookup(SEP),
        eos=int(eos),
        pad=int(pad),
    )


def item_token_matrix(tok: Any, ids: SemanticIdMap) -> np.ndarray:
    """Token ids of every item's semantic ID in ``tok``, looked up by string.

    Args:
        tok: any Hugging Face tokenizer that contains every ``ids.vocabulary()`` token.
        ids: the items' semantic IDs.

    Returns:
        int64 [I, L+1]; row i = the token ids of item i's ID.

    Raises:
        ValidationError: a codebook token is missing from the tokenizer (named).
    """
    vocab = ids.vocabulary()
    found = tok.convert_tokens_to_ids(vocab)
    unk = tok.unk_token_id
    missing = [t for t, i in zip(vocab, found, strict=True) if i is None or i == unk]
    if missing:
        raise ValidationError(
            f"the tokenizer lacks {len(missing)} of the {len(vocab)} codebook tokens "
            f"(e.g. {missing[:3]}); build it with llm_cloud.tokenizer.build_tokenizer or add "
            "them with tokenizer.add_tokens(ids.vocabulary())"
        )
    table = np.asarray(found, dtype=np.int64)  # [V_codebook] vocabulary position -> token id
    positions = ids.codes + np.asarray(ids.level_offsets, dtype=np.int64)  # [I, L+1]
    return table[positions]
