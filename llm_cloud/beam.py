"""Level-wise constrained beam search over an engine that scores one next token at a time.

Shapes: U users, B beams per user, D = L+1 levels (tokens per semantic ID), P prompts
in one engine call (<= U * B).

Used by the ``vllm`` and ``openai`` backends, whose engines cannot run a constrained
beam search themselves (vLLM's own beam search ignores logits processors, and over
HTTP it ignores every constraint; see docs/vllm-cpu-notes.md). Instead the search runs
here and asks the engine D times for one token::

    level 0:  prompts = [prompt_u]                         -> top-B first tokens per user
    level l:  prompts = [prompt_u + prefix_b for b in beams] -> top-B children per beam
              keep the B best (prefix + token, score + logprob) per user

The engine applies the trie constraint (the ``vllm_trie_lp`` logits processor reads the
partial ID after the prompt's last ``<sep>``) and returns *processed* log-probs, i.e.
log-softmax over the valid children only: the same scores as
:func:`llm_cloud.backends.hf.levelwise_beam_search`. Every returned token is checked
against the trie here as well; a token outside it means the engine ran without the
constraint and raises :class:`ConstraintError` instead of being filtered silently.

Example::

    def step(prompts, k):      # engine call: [P][T] -> [P] {token id: logprob}
        ...
    ranked = stepwise_beam_search(step, vocab, prompts, beams=20, top_n=10)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

from llm_cloud.prompts import ItemVocab
from recsys.errors import RecsysError

logger = logging.getLogger(__name__)

Ranked = list[tuple[int, float]]
# prompts [P][T] (token ids), k -> per prompt {token id: constrained log-prob} (top-k)
StepFn = Callable[[list[list[int]], int], list[dict[int, float]]]
MASKED = -9000.0  # vLLM's HTTP server clamps -inf log-probs to -9999.0; below this = masked


class ConstraintError(RecsysError):
    """The engine proposed a token outside the trie: it is not running the trie constraint."""


def stepwise_beam_search(
    step: StepFn,
    vocab: ItemVocab,
    prompts: Sequence[list[int]],
    beams: int,
    top_n: int,
    exclude: Sequence[set[int]] | None = None,
) -> list[Ranked]:
    """Constrained beam search with one engine call per level (see the module docstring).

    Args:
        step: the engine call.
        vocab: item tokens and trie of the model's tokenizer.
        prompts: token-id prompts [U][T_u] ending with ``<sep>``.
        beams: B, beams per user (the engine is asked for the top-B children).
        top_n: N, items returned per user.
        exclude: per user, item indices not to return (applied at the last level).

    Returns:
        [U][<=N] (item index, summed constrained log-prob), best first; ties broken by
        token ids so the result is deterministic.
    """
    trie, depth = vocab.trie, vocab.depth
    beam_lists: list[list[tuple[tuple[int, ...], float]]] = [[((), 0.0)] for _ in prompts]
    for level in range(depth):
        owners: list[tuple[int, tuple[int, ...], float]] = []
        batch: list[list[int]] = []
        for user, current in enumerate(beam_lists):
            for prefix, score in current:
                owners.append((user, prefix, score))
                batch.append([*prompts[user], *prefix])
        tops = step(batch, beams) if batch else []
        if len(tops) != len(batch):
            raise RecsysError(f"the engine answered {len(tops)} of {len(batch)} prompts")
        candidates: list[list[tuple[tuple[int, ...], float]]] = [[] for _ in prompts]
        for (user, prefix, score), top in zip(owners, tops, strict=True):
            allowed = set(trie.allowed_next(prefix))
            for token, logprob in top.items():
                if logprob is None or not math.isfinite(logprob) or logprob <= MASKED:
                    continue  # masked by the constraint (fewer valid children than k)
                if token not in allowed:
                    raise ConstraintError(
                        f"the engine proposed token {token} after {list(prefix)}, which no "
                        "item ID allows: it runs without the trie logits processor (start "
                        "it with `recsys serve llm`, or pass --logits-processors "
                        "llm_cloud.vllm_trie_lp:ItemTrieLogitsProcessor)"
                    )
                path = (*prefix, token)
                if level == depth - 1 and exclude is not None and exclude[user]:
                    item = vocab.item_of(path)
                    if item in exclude[user]:
                        continue
                candidates[user].append((path, score + logprob))
        beam_lists = [sorted(c, key=lambda pc: (-pc[1], pc[0]))[:beams] for c in candidates]
    out: list[Ranked] = []
    for current in beam_lists:
        ranked: Ranked = []
        for path, score in current[:top_n]:
            item = vocab.item_of(path)
            if item is None:  # unreachable: full trie paths are items
                raise ConstraintError(f"search ended on {list(path)}, which names no item")
            ranked.append((item, float(score)))
        out.append(ranked)
    return out
