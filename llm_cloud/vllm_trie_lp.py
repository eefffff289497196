"""vLLM v1 logits processor that only lets valid item semantic IDs be generated.

Runs *inside the vLLM process* (its own virtual environment): imports only vllm, torch
and the standard library, never this project's other modules. Registered when the
engine is built::

    LLM(model=DIR, logits_processors=["llm_cloud.vllm_trie_lp:ItemTrieLogitsProcessor"],
        logprobs_mode="processed_logprobs")
    python -m vllm.entrypoints.openai.api_server ... \\
        --logits-processors llm_cloud.vllm_trie_lp:ItemTrieLogitsProcessor

with the project root on ``PYTHONPATH``. It is enabled per request through
``SamplingParams(extra_args=...)`` (HTTP: ``"vllm_xargs": {...}``); requests without
``item_trie`` are untouched:

* ``item_trie`` (str): path of a JSON file ``[[t_1, ..., t_D], ...]``, every valid ID
  as token ids (``MODEL_DIR/item_trie.json``, written by ``recsys train lm``).
* ``item_sep`` (int, optional): the ``<sep>`` token id. The partial ID then starts after
  the prompt's last ``<sep>``, so a level-wise beam search can put a prefix into the
  prompt and ask for one more token (:mod:`llm_cloud.beam`).
* ``item_eos`` (int, optional): the token allowed after a complete ID (default: the
  model's EOS).

At each step, for each constrained row: the tokens allowed after (prompt tail + output
so far) keep their logits, every other token gets -inf; after a complete ID only EOS is
allowed. Row loop in Python over a dict lookup per row: fine for hundreds of rows per
step (measured in docs/vllm-cpu-notes.md); vectorise if batches reach many thousands.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

Trie = dict[tuple[int, ...], torch.Tensor]  # prefix -> allowed next token ids (int64 [C])


@lru_cache(maxsize=8)
def _load_trie(path: str, mtime_ns: int) -> tuple[Trie, int]:
    """(prefix -> allowed next tokens, ID length) from a trie file (cached per version)."""
    with open(path, encoding="utf-8") as fh:
        paths = json.load(fh)
    if not isinstance(paths, list) or not paths:
        raise ValueError(f"{path}: expected a non-empty JSON list of token-id lists")
    children: dict[tuple[int, ...], set[int]] = {}
    depth = len(paths[0])
    for seq in paths:
        if len(seq) != depth:
            raise ValueError(f"{path}: IDs of different lengths ({depth} and {len(seq)})")
        for i in range(depth):
            children.setdefault(tuple(seq[:i]), set()).add(int(seq[i]))
    trie = {k: torch.tensor(sorted(v), dtype=torch.long) for k, v in children.items()}
    return trie, depth


def load_trie(path: str) -> tuple[Trie, int]:
    """The trie of ``path``, reloaded when the file changes."""
    return _load_trie(path, os.stat(path).st_mtime_ns)


class ItemTrieLogitsProcessor(LogitsProcessor):
    """Batch-level processor: masks every row that carries ``extra_args["item_trie"]``."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        eos = vllm_config.model_config.hf_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        self.device = device
        self.default_eos = torch.tensor(
            [int(e) for e in eos_ids if e is not None], dtype=torch.long
        )
        # batch row -> (trie, prompt tail, output ids (live reference), eos ids)
        self.rows: dict[int, tuple[Trie, tuple[int, ...], list[int], torch.Tensor]] = {}

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        """Reject malformed extra args (ValueError -> HTTP 400)."""
        extra = sampling_params.extra_args or {}
        if "item_trie" not in extra:
            return
        path = extra["item_trie"]
        if not isinstance(path, str) or not os.path.isfile(path):
            raise ValueError(f"item_trie must be the path of a trie JSON file, got {path!r}")
        for key in ("item_sep", "item_eos"):
            value = extra.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{key} must be a token id (int), got {value!r}")

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token is the argmax

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        def new_state(params: Any, prompt_ids: list[int] | None, output_ids: list[int]) -> Any:
            extra = params.extra_args or {}
            if "item_trie" not in extra:
                return None
            trie, _ = load_trie(extra["item_trie"])
            tail: tuple[int, ...] = ()
            sep = extra.get("item_sep")
            if sep is not None and prompt_ids:
                last = max((i for i, t in enumerate(prompt_ids) if t == sep), default=None)
                if last is not None:
                    tail = tuple(prompt_ids[last + 1 :])
            eos = extra.get("item_eos")
            eos_ids = (
                self.default_eos if eos is None else torch.tensor([int(eos)], dtype=torch.long)
            )
            return (trie, tail, output_ids, eos_ids)

        process_dict_updates(self.rows, batch_update, new_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [R, V] -> the same tensor with invalid tokens at -inf in constrained rows."""
        for row, (trie, tail, output_ids, eos_ids) in self.rows.items():
            allowed = trie.get(tail + tuple(output_ids), eos_ids)  # complete ID -> EOS only
            allowed = allowed.to(logits.device)
            keep = logits[row, allowed].clone()
            logits[row] = float("-inf")
            logits[row, allowed] = keep
        return logits
