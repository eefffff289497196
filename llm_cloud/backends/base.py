"""One interface for every way of running the codebook LM, and the factory that picks one.

Shapes: U users per call, H history length (items), N = ``top_n``, B beams per user.

A backend turns user histories (item indices, oldest first) into each user's top-N next
items with scores::

    generate(histories: list[list[int]], top_n: int) -> list[list[tuple[int, float]]]
             [U][H] item indices                         [U][<=N] (item index, log-prob)

The score of an item is the sum of its L+1 token log-probabilities under the trie
constraint (log-softmax over the valid continuations only at each level), so scores are
comparable across backends; lists are sorted best first. Every returned item is a real
catalogue item *by construction*: decoding can only follow the prefix trie of valid
IDs. Fewer than N items come back only when fewer valid IDs remain (tiny catalogue, or
``exclude_history`` removed them).

Backends (:func:`make_backend` imports each lazily):

* ``transformers``: in-process Hugging Face model, level-wise beam search with logits
  masking and a KV cache (or ``search="hf"``: ``generate`` + ``prefix_allowed_tokens_fn``).
* ``vllm``: a ``vllm.LLM`` engine in a worker process of the vLLM environment.
* ``openai``: HTTP to a running vLLM OpenAI-compatible server started with the trie
  logits processor (``recsys serve llm``).

Example::

    with make_backend("transformers", "artifacts/ml-100k/lm") as backend:
        backend.generate([[3, 17, 42], []], top_n=10)
        # [[(812, -2.31), (95, -2.77), ...], [(49, -3.05), ...]]
"""

from __future__ import annotations

import importlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from llm_cloud.prompts import ItemVocab
from recsys.errors import ValidationError
from recsys.validation import config_dataclass

logger = logging.getLogger(__name__)

Ranked = list[tuple[int, float]]  # (item index, score), best first
# prompts [u][T_u] of one batch, their exclusions (or None) -> [u][<=N]
BatchSearch = Callable[[list[list[int]], list[set[int]] | None], list[Ranked]]


def in_user_batches(
    search: BatchSearch,
    prompts: list[list[int]],
    exclude: list[set[int]] | None,
    batch_users: int,
) -> list[Ranked]:
    """``search`` over consecutive batches of ``batch_users`` users, results in order:
    each batch gets its own slice of ``exclude``. [U][T_u] -> [U][<=N]."""
    out: list[Ranked] = []
    for start in range(0, len(prompts), batch_users):
        part = None if exclude is None else exclude[start : start + batch_users]
        out.extend(search(prompts[start : start + batch_users], part))
    return out


@config_dataclass
class BackendConfig:
    """Settings shared by every backend (validated and frozen: change one with
    ``dataclasses.replace``).

    Attributes:
        codebook_dir: the codebook whose tokens the model's tokenizer holds; None = the
            copy inside a ``recsys train lm`` directory.
        max_history: items kept from the end of a history; None = what the LM was
            trained with (``recsys_lm.json``), else 20.
        beam_width: beams per user and level; None = max(top_n, 10). Must be >= top_n.
            Wider beams find more of the truly most likely IDs (recall) at linear cost.
        exclude_history: drop the user's own history items from the results (applied
            inside the search at the last level, so the beam fills with unseen items).
        batch_users: users per forward batch (transformers: the KV cache holds
            batch_users * beam_width rows; HTTP/vLLM: users per request round).
    """

    codebook_dir: str | Path | None = None
    max_history: int | None = Field(None, ge=0)
    beam_width: int | None = Field(None, ge=1)
    exclude_history: bool = False
    batch_users: int = Field(64, ge=1)

    def beams_for(self, top_n: int) -> int:
        """Beam width for a request of ``top_n`` (validated)."""
        if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
            raise ValidationError(f"top_n must be a positive integer, got {top_n!r}")
        beams = self.beam_width if self.beam_width is not None else max(top_n, 10)
        if beams < top_n:
            raise ValidationError(f"beam_width {beams} must be >= top_n {top_n}")
        return int(beams)


class Backend(ABC):
    """Base class: validates inputs, builds prompts, delegates the search to subclasses.

    Subclasses set ``self.vocab`` and implement :meth:`_search`; they may override
    :meth:`close` to release processes or memory. Use as a context manager.
    """

    name: str = "base"
    vocab: ItemVocab
    config: BackendConfig

    def generate(self, histories: Sequence[Sequence[int]], top_n: int) -> list[Ranked]:
        """Top-``top_n`` next items per user (see the module docstring).

        Histories may be lists or int arrays of item indices, oldest first.

        Raises:
            ValidationError: ``top_n`` < 1, or a history entry is not an integer.
            NotFoundError: a history item index is outside the catalogue.
        """
        if isinstance(histories, np.ndarray):
            histories = list(histories)
        if isinstance(histories, str | bytes) or not isinstance(histories, Sequence):
            raise ValidationError("histories must be a list of item-index lists")
        beams = self.config.beams_for(top_n)
        prompts: list[list[int]] = []
        exclude: list[set[int]] | None = [] if self.config.exclude_history else None
        for history in histories:
            if isinstance(history, np.ndarray):
                history = history.tolist()
            if isinstance(history, str | bytes) or not isinstance(history, Sequence):
                raise ValidationError(f"a history must be a list of item indices, got {history!r}")
            prompts.append(self.vocab.prompt_ids(history))  # validates every index
            if exclude is not None:
                exclude.append({int(i) for i in history})
        if not prompts:
            return []
        results = in_user_batches(
            lambda batch, seen: self._search(batch, beams, top_n, seen),
            prompts,
            exclude,
            self.config.batch_users,
        )
        self._verify(results, top_n)
        return results

    @abstractmethod
    def _search(
        self, prompts: list[list[int]], beams: int, top_n: int, exclude: list[set[int]] | None
    ) -> list[Ranked]:
        """Constrained beam search for validated prompts of one batch of at most
        ``config.batch_users`` users: [u][T] -> [u][<=top_n]."""

    def _verify(self, results: list[Ranked], top_n: int) -> None:
        """Belt and braces: the trie already guarantees valid items; check cheaply."""
        num_items = self.vocab.num_items
        for ranked in results:
            if len(ranked) > top_n or any(not 0 <= item < num_items for item, _ in ranked):
                raise RuntimeError(f"{self.name} backend returned an invalid result: {ranked[:3]}")

    def info(self) -> dict[str, Any]:
        """What runs where (for logs and benchmark JSON)."""
        return {"backend": self.name}

    def close(self) -> None:  # noqa: B027 - a no-op by default: in-process backends hold nothing
        """Release processes / memory (idempotent)."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# name -> "module:Class"; imported only when chosen, so vLLM/HTTP code stays out of the way
BACKENDS: dict[str, str] = {
    "transformers": "llm_cloud.backends.hf:TransformersBackend",
    "vllm": "llm_cloud.backends.vllm_worker_backend:VllmBackend",
    "openai": "llm_cloud.backends.openai_backend:OpenAIBackend",
}


def make_backend(
    name: str,
    model_dir: str | Path,
    config: BackendConfig | None = None,
    **options: Any,
) -> Backend:
    """Build the backend called ``name`` for the model in ``model_dir``.

    Args:
        name: one of :data:`BACKENDS`.
        model_dir: a ``recsys train lm`` directory, or any HF causal-LM directory whose
            tokenizer holds the codebook tokens (then set ``config.codebook_dir``).
        config: shared settings.
        **options: backend-specific keyword arguments (see each backend class).
    """
    target = BACKENDS.get(name)
    if target is None:
        raise ValidationError(f"unknown LLM backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module_name, cls_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(model_dir, config or BackendConfig(), **options)
