"""Building the cloud's :class:`~llm_cloud.service.engine.ComposedEngine` from trained
artefacts: the adaptor artefact (``codebook.adaptor_artifact``), the semantic IDs, the
codebook LM when the adaptor was trained on its tokens, the prototype bank and the store,
and, when edit refinement is on (issue 13), the ranker head the artefact names
(:func:`head_from_checkpoint`: read from the checkpoint file as plain tensors; the cloud
never imports the device package).

Example::

    engine = engine_from_artifacts(ArtifactEngineConfig("CACHE/artifacts/ml-100k/adaptor/adaptor.pt"))
    engine.info()["tokens"]   # "lm", "recent" or "none"
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

from codebook.refine import HeadTensors, RefineConfig
from llm_cloud.service.engine import ComposedEngine, EditRefiner
from recsys.adaptor_inputs import LMTokens, NoTokens, RecentTokens, TokenSource
from recsys.errors import ValidationError
from recsys.validation import config_dataclass

logger = logging.getLogger(__name__)


@config_dataclass
class ArtifactEngineConfig:
    """Where a :class:`ComposedEngine`'s trained pieces are.

    Attributes:
        adaptor_path: ``recsys train adaptor``'s artefact (``artifacts/NAME/adaptor/adaptor.pt``).
        codebook_dir: the semantic IDs (default ``artifacts/NAME/codebook`` beside it).
        lm_dir: the LM (default: the one the artefact names, else ``artifacts/NAME/lm``), used when the adaptor
            was trained on LM tokens.
        lm_backend: ``transformers``, ``vllm`` or ``openai`` (see ``llm_cloud.backends``).
        lm_options: backend keyword arguments (e.g. ``url`` for ``openai``).
        store_url: the prototype store (default: the one the training wrote).
        prototypes: use the prototype bank (False = absolute edits, no residuals).
        refine: refine the edits of requests that carry the device's recent states
            (``codebook.refine.RefineConfig``; None = the artefact's ``cloud_refine``
            entry when it has one, e.g. the replay's copy, else off).
    """

    adaptor_path: str
    codebook_dir: str | None = None
    lm_dir: str | None = None
    lm_backend: Literal["transformers", "vllm", "openai"] = "transformers"
    lm_options: Mapping[str, Any] = field(default_factory=dict)
    store_url: str | None = None
    prototypes: bool = True
    refine: RefineConfig | None = None


CHECKPOINT_FORMAT = "device_ranker.checkpoint.v1"  # device_ranker.train's checkpoint dict
ITEM_TABLE_KEY = "embeddings.embeddings.item.weight"
HEAD_PREFIX = "head.layers."


def head_from_checkpoint(path: str | Path) -> HeadTensors:
    """The ranker's head layers, residual flag, item table and item bias from its
    training checkpoint (the best weights, as the device loads them), as
    :class:`codebook.refine.HeadTensors`."""
    import torch

    ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValidationError(
            f"{path} is not a device ranker checkpoint (format {ckpt.get('format')!r})"
        )
    state = ckpt.get("best_state") or ckpt["model_state"]
    names = [k[len(HEAD_PREFIX) : -len(".weight")] for k in state
             if k.startswith(HEAD_PREFIX) and k.endswith(".weight")]  # fmt: skip
    if not names:
        raise ValidationError(f"{path}: the checkpoint has no head layers")
    layers = [
        (n, state[f"{HEAD_PREFIX}{n}.weight"], state[f"{HEAD_PREFIX}{n}.bias"]) for n in names
    ]
    table = state[ITEM_TABLE_KEY]
    return HeadTensors.from_weights(
        layers,
        residual=bool(ckpt["model_config"].get("head_residual", True)),
        item_table=table,
        item_bias=state.get("item_bias", torch.zeros(len(table))),
    )


def edit_refiner(art: Mapping[str, Any], cfg: RefineConfig) -> EditRefiner:
    """The refiner of the artefact's ranker (``ranker_path``), clipping to the
    generator's bounds as the adaptor does."""
    bounds = art["bounds"]
    ranker = Path(str(art.get("ranker_path", "")))
    if not ranker.is_file():
        raise ValidationError(
            f"edit refinement needs the ranker the adaptor was trained against; {ranker} "
            "(the artefact's ranker_path) is not a file"
        )
    return EditRefiner(
        head_from_checkpoint(ranker),
        cfg,
        bound=float(bounds["generator_max_weight_norm"]),
        bias_bound=float(bounds["generator_max_bias_abs"]),
    )


def engine_from_artifacts(cfg: ArtifactEngineConfig) -> ComposedEngine:
    """Load the adaptor artefact, the semantic IDs, the LM (if its tokens were used), the
    prototype bank and the store into a :class:`ComposedEngine`."""
    from codebook.adaptor_artifact import adaptor_from_artifact, artifact_lm_dir, load_artifact
    from codebook.semantic_ids import SemanticIdMap
    from codebook.store import PrototypeStore
    from recsys.serving.fingerprint import file_fingerprint

    path = Path(cfg.adaptor_path)
    art = load_artifact(path)
    root = path.parent.parent  # artifacts/NAME
    ids = SemanticIdMap.load(cfg.codebook_dir or root / "codebook")
    if ids.item_ids is None:
        raise ValidationError(
            "the codebook has no item ids; retrain it with `recsys train codebook`"
        )
    adaptor = adaptor_from_artifact(art)
    n = int(adaptor.cfg.max_items)
    source = art.get("token_source")
    if source == "lm":
        from llm_cloud.backends import BackendConfig, make_backend

        lm_dir = (
            Path(cfg.lm_dir) if cfg.lm_dir else artifact_lm_dir(art, root.parent.parent, root.name)
        )
        backend = make_backend(
            cfg.lm_backend, lm_dir, BackendConfig(exclude_history=True), **dict(cfg.lm_options)
        )
        tokens: TokenSource = LMTokens(backend, n)
    elif source == "none":
        tokens = NoTokens(n)
    else:
        tokens = RecentTokens(n)
    store = bank = None
    store_url = cfg.store_url or art.get("store_url")
    if store_url:
        store = PrototypeStore.open(store_url, upgrade=True)
    if cfg.prototypes and store is not None:
        from codebook.prototypes import PrototypeBank, PrototypeConfig

        pcfg = PrototypeConfig(**art["config"]["prototypes"])
        bounds = art["bounds"]
        bank = PrototypeBank.load(
            store,
            adaptor.decode,
            adaptor.cfg.head_spec,
            pcfg,
            bound=bounds["device_max_weight_norm"],
            bias_bound=bounds["device_max_bias_abs"],
            spawn_threshold=float(art.get("prototypes", {}).get("spawn_threshold", math.inf)),
        )
    ranker_path = Path(art.get("ranker_path", ""))
    model_version = file_fingerprint(ranker_path) if ranker_path.is_file() else None
    refine = cfg.refine
    if refine is None and art.get("cloud_refine") is not None:
        refine = RefineConfig(**dict(art["cloud_refine"]))
    refiner = edit_refiner(art, refine) if refine is not None else None
    logger.info(
        "cloud engine: adaptor %s (tokens %s, N=%d, S=%d), %d prototypes, ranker %s, refine %s",
        path,
        tokens.name,
        n,
        adaptor.cfg.summary_dim,
        len(bank.live) if bank is not None else 0,
        model_version,
        refiner.describe() if refiner is not None else "off",
    )
    return ComposedEngine(
        item_ids=[str(i) for i in ids.item_ids],
        ids=ids,
        adaptor=adaptor,
        tokens=tokens,
        bank=bank,
        store=store,
        model_version=model_version,
        info={"adaptor_path": str(path), "bounds": dict(art.get("bounds", {}))},
        # artefacts from before the field: the training default (the LM's prompt length)
        uplink_items=int(art["config"]["windows"].get("uplink_items", 20)),
        refiner=refiner,
    )
