"""The adaptor artefact: where it lives and how it is read back.

``recsys train adaptor`` writes one ``torch.save`` of an explicit dict to
``artifacts/NAME/adaptor/adaptor.pt`` (keys in :mod:`recsys.workflows.adaptor_training`);
the replay, the evaluation and the cloud service (:mod:`llm_cloud.service`) read it with
:func:`load_artifact` and rebuild the generators with :func:`generators_from_artifact` /
:func:`adaptor_from_artifact`. It lives in ``codebook`` (beside the generators it
rebuilds) so that the cloud side can read it without the application layer.

Example::

    art = load_artifact(artifact_dir(cache, "ml-100k") / "adaptor.pt")
    adaptor, duet = generators_from_artifact(art)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from codebook.adaptor import Adaptor, AdaptorConfig, head_spec
from codebook.duet import DuetConfig, DuetGenerator
from codebook.semantic_ids import SemanticIdMap
from recsys.errors import NotFoundError, ValidationError

if TYPE_CHECKING:
    from codebook.prototypes import PrototypeBank
    from codebook.prototypes.algebra import DecodeFn
    from codebook.store import PrototypeStore

ARTIFACT_FORMAT = "recsys.adaptor_artifact.v1"


def artifact_dir(cache: Path, dataset: str) -> Path:
    return cache / "artifacts" / dataset / "adaptor"


def default_lm_dir(cache: Path, dataset: str) -> Path:
    """Where ``recsys train lm`` writes the codebook LM: ``cache/artifacts/NAME/lm``."""
    return Path(cache) / "artifacts" / dataset / "lm"


def lm_dir_record(lm_dir: Path, cache: Path) -> str:
    """How an artefact names the LM directory it was trained with: relative to the cache
    dir when inside it (artefacts move with the cache), else absolute."""
    path = Path(lm_dir).expanduser().resolve()
    try:
        return path.relative_to(Path(cache).expanduser().resolve()).as_posix()
    except ValueError:
        return str(path)


def artifact_lm_dir(art: Mapping[str, Any], cache: Path, dataset: str) -> Path:
    """The LM directory an adaptor artefact's tokens come from: its ``lm_dir`` (relative
    to ``cache`` unless absolute), else (artefacts saved before it was recorded)
    ``cache/artifacts/NAME/lm``."""
    rec = art.get("lm_dir")
    if not rec:
        return default_lm_dir(cache, dataset)
    path = Path(str(rec))
    return path if path.is_absolute() else Path(cache) / path


def load_semantic_ids(cache: Path, dataset: str, codebook_dir: str | Path | None = None):
    """The dataset's semantic IDs (``artifacts/NAME/codebook``)."""
    path = Path(codebook_dir) if codebook_dir else cache / "artifacts" / dataset / "codebook"
    if not (path / "semantic_ids.npy").is_file():
        raise NotFoundError(
            f"no codebook at {path}; run `recsys train codebook --dataset {dataset}` first"
        )
    return SemanticIdMap.load(path)


def load_artifact(path: Path) -> dict[str, Any]:
    """The saved artefact dict (plain tensors and Python values)."""
    if not path.is_file():
        raise NotFoundError(f"no trained adaptor at {path}; run `recsys train adaptor` first")
    art = torch.load(path, map_location="cpu", weights_only=True)
    if art.get("format") != ARTIFACT_FORMAT:
        raise ValidationError(f"{path} is not an adaptor artefact (format {art.get('format')!r})")
    return art


def adaptor_from_artifact(art: Mapping[str, Any]) -> Adaptor:
    """The trained adaptor of ``art`` (eval mode)."""
    adaptor = Adaptor(AdaptorConfig.from_dict(art["adaptor_config"]))
    adaptor.load_state_dict(art["adaptor_state"])
    return adaptor.eval()


def fresh_bank_from_artifact(
    art: Mapping[str, Any], store: PrototypeStore, name_prefix: str, decode: DecodeFn | None = None
) -> PrototypeBank:
    """The artefact's prototypes as version 1 of new prototypes ``name_prefix-k`` in
    ``store`` (its centroids, prototype config, device bounds, k-means member counts and
    spawn threshold); ``decode``: the adaptor's decoder if the caller already holds it.
    The global-time replay starts every live bank from this, in process and through the
    services alike."""
    from codebook.prototypes import PrototypeBank, PrototypeConfig

    pcfg = PrototypeConfig(**{**art["config"]["prototypes"], "name_prefix": name_prefix})
    protos = dict(art.get("prototypes", {}))
    centroids = art["prototype_centroids"].numpy().astype(np.float32)  # [P, C]
    bounds = art["bounds"]
    if decode is None:
        decode = adaptor_from_artifact(art).decode
    return PrototypeBank.create(
        store,
        centroids,
        decode,
        head_spec(art["adaptor_config"]["head_spec"]),
        pcfg,
        bound=bounds["device_max_weight_norm"],
        bias_bound=bounds["device_max_bias_abs"],
        member_counts=np.asarray(protos.get("sizes", np.zeros(len(centroids)))),
        spawn_threshold=float(protos.get("spawn_threshold", math.inf)),
    )


def generators_from_artifact(art: Mapping[str, Any]) -> tuple[Adaptor, DuetGenerator]:
    """The trained adaptor and DUET-style generator of ``art`` (eval mode)."""
    adaptor = adaptor_from_artifact(art)
    duet = DuetGenerator(DuetConfig.from_dict(art["duet_config"]))
    duet.load_state_dict(art["duet_state"])
    return adaptor.eval(), duet.eval()


__all__ = [
    "ARTIFACT_FORMAT",
    "adaptor_from_artifact",
    "artifact_dir",
    "fresh_bank_from_artifact",
    "generators_from_artifact",
    "load_artifact",
    "load_semantic_ids",
]
