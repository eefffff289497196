"""A tiny, untrained engine for tests and smoke runs: the real pieces at toy size.

:func:`build_tiny_engine` wires the same :class:`~llm_cloud.service.engine.ComposedEngine`
as production, from random stand-ins for the trained artefacts: random 2-level semantic
IDs for the catalogue, a randomly initialised ``codebook.adaptor.Adaptor`` whose output
layers are re-drawn so that edits are non-zero (a fresh adaptor's first edit is exactly
zero by design), the recent-items token source, and, with a store, a
``codebook.prototypes.PrototypeBank`` fitted on the codes of random histories (or loaded
when the store already holds it, e.g. after a restart). Everything is seeded and builds
in well under a second.

Example::

    engine = build_tiny_engine(item_ids, {"fc0": (16, 8), "fc1": (8, 16)},
                               store_url="sqlite:////tmp/tiny.sqlite")
    engine.generate_edits([EditRequest("u1", np.array([3, 4, 5]))])
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from llm_cloud.service.engine import ComposedEngine
from recsys.adaptor_inputs import RecentTokens, item_codes
from recsys.errors import ValidationError

logger = logging.getLogger(__name__)


def parse_head_spec(text: str) -> dict[str, tuple[int, int]]:
    """``"fc0=16x8,fc1=8x16"`` -> ``{"fc0": (16, 8), "fc1": (8, 16)}`` (out x in)."""
    spec: dict[str, tuple[int, int]] = {}
    try:
        for part in text.split(","):
            name, shape = part.split("=")
            out_f, in_f = shape.lower().split("x")
            spec[name.strip()] = (int(out_f), int(in_f))
    except ValueError:
        raise ValidationError(
            f"bad head spec {text!r}; expected e.g. 'fc0=128x64,fc1=64x128' (out x in per layer)"
        ) from None
    return spec


def build_tiny_engine(
    item_ids: Sequence[str],
    head_spec: Mapping[str, tuple[int, int]],
    *,
    store_url: str | None = None,
    seed: int = 0,
    rank: int = 2,
    top_n: int = 10,
    num_prototypes: int = 2,
    max_weight_norm: float = 1.0,
    max_bias_abs: float = 0.05,
    codes_per_level: int = 4,
) -> ComposedEngine:
    """A seeded toy :class:`ComposedEngine` (see the module docstring)."""
    from codebook.adaptor import Adaptor, AdaptorConfig
    from codebook.semantic_ids import SemanticIdMap

    rng = np.random.default_rng(seed)
    num_items = len(item_ids)
    if num_items < 2:
        raise ValidationError("the tiny engine needs a catalogue of at least 2 items")
    ids = SemanticIdMap.from_codes(
        rng.integers(0, codes_per_level, size=(num_items, 2)), codes_per_level, item_ids
    )
    torch.manual_seed(seed)
    adaptor = Adaptor(
        AdaptorConfig(
            vocab_sizes=tuple(ids.vocab_sizes),
            head_spec=tuple((n, o, i) for n, (o, i) in head_spec.items()),
            max_items=top_n,
            token_dim=8,
            code_dim=8,
            hidden=16,
            rank=rank,
            max_weight_norm=max_weight_norm,
            max_bias_abs=max_bias_abs,
            dropout=0.0,
        )
    ).eval()
    with torch.no_grad():  # untrained: make the edits visible (and history-dependent)
        for layer in adaptor.decoder.out:
            layer.weight.normal_(0.0, 0.5)
            layer.bias.normal_(0.0, 0.5)
    tokens = RecentTokens(top_n)
    store = bank = None
    if store_url:
        from codebook.prototypes import PrototypeBank, PrototypeConfig, fit_prototypes
        from codebook.store import PrototypeStore

        store = PrototypeStore.open(store_url, upgrade=True)
        pcfg = PrototypeConfig(
            num_prototypes=num_prototypes, residual_rank=rank, refine_every=2, seed=seed,
            name_prefix="tiny",
        )  # fmt: skip

        def fit() -> dict[str, np.ndarray]:  # only on an empty store, by one replica
            histories = [rng.integers(0, num_items, size=8) for _ in range(64)]
            items, _ = tokens(histories)
            codes = item_codes(items, ids.codes)
            with torch.no_grad():
                train_codes = adaptor.encode(torch.from_numpy(codes)).numpy()
            centroids, _ = fit_prototypes(train_codes, pcfg)
            return {"centroids": centroids, "train_codes": train_codes}

        # replicas starting together on one empty store: one fits and stores, all load it
        bank, _ = PrototypeBank.load_or_create(
            store, adaptor.decode, head_spec, pcfg, fit=fit,
            bound=max_weight_norm * 2, bias_bound=max_bias_abs * 2,
        )  # fmt: skip
    return ComposedEngine(
        item_ids=list(item_ids),
        ids=ids,
        adaptor=adaptor,
        tokens=tokens,
        bank=bank,
        store=store,
        model_version=None,
        info={"engine": "tiny", "seed": seed},
    )
