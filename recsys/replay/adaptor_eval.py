"""``recsys eval adaptor``: the adaptor's check on the replay period, a preset of the
replay core (:func:`recsys.replay.engine.run_replay`).

Four policies on the same stream (the core's protocol: time split at the artefact's
quantile, warm and new users, full-catalogue ranking with seen items excluded, AUC on
seeded sampled negatives, user-bootstrap CIs of the NDCG@10 difference to the base):

* ``static base``: the frozen ranker, no edit;
* ``adaptor (no prototypes)``: the adaptor's own bounded edit (``system-noproto``);
* ``adaptor + prototypes``: the full system, a residual against the nearest prototype;
* ``DUET-style (item ids)``: the baseline generator from raw recent item ids.

Every adapted policy requests on a timer: first when the device has ``min_history``
events, then every ``refresh_every`` events (default: the adaptor's training window W);
an edit serves the events after its request only.

The prototype bank is FROZEN at the artefact's version, as in every replay of the core
(a device's edits depend on its own events only). The online prototype refinement and
the ``prototype_sync`` modes of the earlier, separate evaluation loop are gone; online
refinement returns inside the core with the global-time replay (issue 13).

Example::

    summary = evaluate_adaptor(EvalConfig(refresh_every=5), ds, cache=settings.cache_dir())
    summary["policies"]["adaptor + prototypes"]["ndcg@10_diff_ci95"]
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from codebook.adaptor_artifact import load_artifact
from recsys.data import Dataset
from recsys.replay.config import PolicySpec, ReplayConfig
from recsys.replay.engine import resolve_artifact, run_replay
from recsys.replay.report import summarise
from recsys.validation import config_dataclass
from recsys.workflows.adaptor_config import config_from_dict

logger = logging.getLogger(__name__)

BASE, ADAPTOR, PROTO, DUET = (
    "static base",
    "adaptor (no prototypes)",
    "adaptor + prototypes",
    "DUET-style (item ids)",
)
POLICIES = (BASE, ADAPTOR, PROTO, DUET)


@config_dataclass
class EvalConfig:
    """The evaluation's options (the rest is the replay core's protocol)."""

    min_history: int = Field(5, ge=2)  # events before a device is evaluated and first requests
    refresh_every: int | None = Field(None, ge=1)  # events between requests; None = window W
    negatives: int = Field(100, ge=1)  # sampled negatives per event for UAUC
    payload_dtype: Literal["fp16", "int8", "fp32"] = "fp16"  # downlink precision
    batch_size: int = Field(256, ge=1)  # events scored per batch
    max_users: int | None = Field(None, ge=1)  # seeded sample of users (None = all)
    workers: int = Field(1, ge=1)  # processes the users are split across
    seed: int = 0


def adaptor_policies(refresh_every: int) -> list[PolicySpec]:
    """The four policies, adapted ones on a timer with period ``refresh_every``."""
    budget = 1.0 / refresh_every  # PolicySpec.period = round(1 / budget) = refresh_every
    return [
        PolicySpec(kind="static", name=BASE),
        PolicySpec(kind="system", trigger="timer", budget=budget, prototypes=False, name=ADAPTOR),
        PolicySpec(kind="system", trigger="timer", budget=budget, name=PROTO),
        PolicySpec(kind="duet", trigger="timer", budget=budget, name=DUET),
    ]


def evaluate_adaptor(
    cfg: EvalConfig,
    ds: Dataset,
    *,
    cache: Path,
    artifact_path: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Replay the later period through the four policies.

    Returns:
        the core's report summary (:func:`recsys.replay.report.summarise`: ``meta``,
        ``policies`` keyed by the names above, ``order``, ``over_time``) plus
        ``eval_config`` (with the resolved ``refresh_every``).
    """
    where = ReplayConfig(artifact=str(artifact_path) if artifact_path else None)
    path = resolve_artifact(ds, where, Path(cache))
    tcfg = config_from_dict(load_artifact(path)["config"])
    refresh = cfg.refresh_every or tcfg.windows.window
    rcfg = ReplayConfig(
        quantile=tcfg.quantile,
        min_history=cfg.min_history,
        negatives=cfg.negatives,
        payload_dtype=cfg.payload_dtype,
        batch_size=cfg.batch_size,
        max_users=cfg.max_users,
        workers=cfg.workers,
        seed=cfg.seed,
        artifact=str(path),
    )
    run = run_replay(ds, rcfg, adaptor_policies(refresh), cache=Path(cache), progress=progress)
    summary = summarise(run)
    summary["eval_config"] = asdict(cfg) | {"refresh_every_resolved": refresh}
    return summary


__all__ = ["POLICIES", "EvalConfig", "adaptor_policies", "evaluate_adaptor"]
