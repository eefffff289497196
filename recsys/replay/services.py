"""The services a replay runs through: which policies they serve, their command lines,
and starting / stopping them.

* **cloud** (``recsys serve cloud --engine artifacts``): the adaptor artefact's LM (or
  recent-item) tokens, adaptor and prototypes, on a copy of the artefact whose prototype
  bank is frozen (never refined, never spawned: the in-process replay's bank is frozen at
  the artefact's version 1) and a copy of its store; micro-batching off, so an edit never
  depends on which other devices asked at the same moment (:func:`cloud_argv`); when a
  ``system-refine`` policy is replayed the copy also carries the protocol's refinement
  settings (``cloud_refine``: ``ReplayConfig.refine``), so the cloud refines the edits
  of requests that carry the device's recent states and sends them whole;
* **the live cloud** of the global-time replay (``system-live``,
  :mod:`recsys.replay.grpc_global`): a copy of the artefact that keeps refining and
  spawning (:func:`live_artifact`), loading the fresh bank the driver created in the
  replay's store (:func:`live_cloud_argv`);
* **device** (``recsys serve device``), one per policy: the time-split ranker with the
  artefact's edit bounds, every user seeded with its training-period history, the
  policy's trigger (``gate`` with the threshold calibrated once by
  :func:`recsys.replay.engine.prepare_replay`, or ``timer``), the same uplink (recent
  items, summary) and payload precision as the protocol; ranking one call at a time; a
  ``system-refine`` device also uplinks its user states before its last
  ``refine.positions`` positions, in fp32 (:data:`REFINE_STATE_DTYPE`)
  (:func:`device_argv`).

:func:`server` starts one as a child process on a loopback port and records its
startup time and exit code; :func:`display_argv` strips machine-specific paths from the
command lines written into results.

Example::

    argv = cloud_argv(art, art_path, cache, "ml-100k", tmp)
    with server(argv, "cloud", tmp, info) as cloud:
        wait_ready(cloud, 600.0, info)
        cloud.target                                  # "127.0.0.1:PORT"
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from codebook.refine import RefineConfig
from recsys.errors import ValidationError
from recsys.replay.config import PolicySpec, ReplayConfig
from recsys.replay.policies import trigger_key
from recsys.serving.process import ServerProcess

logger = logging.getLogger(__name__)

GRPC_KINDS = ("static", "system")
# wire precision of the states a system-refine device uplinks in the replay: fp32, so the
# cloud refines on exactly the states the in-process replay uses (fp16 rounding, 2^-11
# relative, moves Adam's first steps where gradients are near zero)
REFINE_STATE_DTYPE = "fp32"


def check_grpc_policies(specs: Sequence[PolicySpec]) -> list[PolicySpec]:
    """The policies the deployed services can run (static, system with prototypes,
    system-refine); others: a clear error."""
    bad = [s.label for s in specs if s.kind not in GRPC_KINDS]
    if bad:
        raise ValidationError(
            f"--via grpc runs the deployed services, which serve only {list(GRPC_KINDS)} "
            f"policies; {bad} have no service (on-device fine-tuning, the DUET baseline): "
            "replay them in process, or leave them out"
        )
    bare = [s.label for s in specs if not s.prototypes and not s.refine]
    if bare:
        raise ValidationError(
            f"the cloud service sends prototype residuals (or, to a device that uplinks its "
            f"states, a refined edit); {bare} (no prototypes, no refinement) runs in process only"
        )
    return list(specs)


def frozen_artifact(art: dict[str, Any], dest: Path, refine: RefineConfig | None = None) -> Path:
    """Write a copy of the adaptor artefact whose prototype bank never changes.

    The cloud refines a prototype every ``refine_every`` member edits and spawns one when
    enough residuals are far; the in-process replay freezes the bank at the artefact's
    version, so the copy sets ``refine_every`` beyond reach and the spawn threshold to
    +inf. Everything else (weights, bounds, ranker, token source) is unchanged. With
    ``refine`` the copy also asks the cloud to refine the edits of requests that carry
    states (the ``cloud_refine`` entry ``llm_cloud.service.loading`` reads).
    """
    frozen = dict(art)
    if refine is not None:
        frozen["cloud_refine"] = {"steps": refine.steps, "lr": refine.lr,
                                  "positions": refine.positions}  # fmt: skip
    cfg = dict(art["config"])
    cfg["prototypes"] = dict(cfg["prototypes"], refine_every=2**62)
    frozen["config"] = cfg
    frozen["prototypes"] = dict(art.get("prototypes", {}), spawn_threshold=math.inf)
    torch.save(frozen, dest)
    return dest


def _store_copy(art: dict[str, Any], tmp: Path) -> list[str]:
    """``--store-url`` of a private copy of the artefact's SQLite store (the edit log and
    assignments the replay writes stay out of it); other stores are used as they are."""
    url = str(art.get("store_url") or "")
    if url.startswith("sqlite:///"):
        src = Path(url.removeprefix("sqlite:///"))
        if src.is_file():
            dest = tmp / "prototypes.sqlite"
            shutil.copy(src, dest)
            return ["--store-url", f"sqlite:///{dest}"]
    return ["--store-url", url] if url else []


def live_artifact(art: dict[str, Any], dest: Path, *, store_url: str, name_prefix: str) -> Path:
    """Write a copy of the adaptor artefact whose prototype bank REFINES online.

    Unlike :func:`frozen_artifact`, ``refine_every`` and the spawn threshold stay the
    artefact's; the copy names the store (``store_url``) and the prototypes
    (``name_prefix``: the bank the global-time driver created there as version 1,
    :func:`codebook.adaptor_artifact.fresh_bank_from_artifact`), so the cloud loads exactly that bank.
    """
    live = dict(art, store_url=store_url)
    cfg = dict(art["config"])
    cfg["prototypes"] = dict(cfg["prototypes"], name_prefix=name_prefix)
    live["config"] = cfg
    torch.save(live, dest)
    return dest


def _cloud_argv(adaptor: Path, art: dict[str, Any], cache: Path, dataset: str) -> list[str]:
    from codebook.adaptor_artifact import artifact_lm_dir
    from recsys.workflows.adaptor_config import config_from_dict

    tcfg = config_from_dict(art["config"])
    root = Path(cache) / "artifacts" / dataset
    lm = artifact_lm_dir(art, cache, dataset)  # the LM the adaptor was trained with
    return [
        "serve", "cloud", "--engine", "artifacts", "--adaptor", str(adaptor),
        "--codebook-dir", str(root / "codebook"), "--lm-dir", str(lm),
        "--lm-backend", tcfg.lm_backend,
        "--batch-max", "1", "--batch-wait-ms", "0", "--torch-threads", "1",
        # store writes inside the request, as the in-process replay does: a refinement
        # must reach the bank before the next request (write-behind installs it a batch
        # later, which the parity with the in-process replay would not survive)
        "--no-write-behind",
    ]  # fmt: skip


def cloud_argv(
    art: dict[str, Any],
    art_path: Path,
    cache: Path,
    dataset: str,
    tmp: Path,
    refine: RefineConfig | None = None,
) -> list[str]:
    """``recsys serve cloud`` arguments for the replay (frozen bank, no micro-batching;
    ``refine``: edits of requests with states are refined so)."""
    frozen = frozen_artifact(art, tmp / art_path.name, refine)
    return [*_cloud_argv(frozen, art, cache, dataset), *_store_copy(art, tmp)]


def live_cloud_argv(
    art: dict[str, Any],
    art_path: Path,
    cache: Path,
    dataset: str,
    tmp: Path,
    *,
    store_url: str,
    name_prefix: str,
) -> list[str]:
    """``recsys serve cloud`` arguments for the global-time replay of ``system-live``:
    the bank ``name_prefix-*`` in ``store_url`` refined online (:func:`live_artifact`),
    one request at a time (no micro-batching)."""
    live = live_artifact(art, tmp / f"live-{art_path.name}", store_url=store_url,
                         name_prefix=name_prefix)  # fmt: skip
    return [*_cloud_argv(live, art, cache, dataset), "--store-url", store_url]


def device_argv(
    spec: PolicySpec | None,
    cfg: ReplayConfig,
    art: dict[str, Any],
    ds_dir: Path,
    thresholds: dict[float, float],
    cloud_target: str | None,
    cloud_deadline_s: float = 600.0,
) -> list[str]:
    """``recsys serve device`` arguments reproducing the in-process device of ``spec``
    (None: a device whose arms come from an experiment, linked to the cloud)."""
    from recsys.workflows.adaptor_config import config_from_dict

    tcfg = config_from_dict(art["config"])
    bounds = art["bounds"]
    argv = [
        "serve", "device", "--checkpoint", str(art["ranker_path"]), "--dataset", str(ds_dir),
        "--seed-histories", "time", "--seed-quantile", repr(cfg.quantile),
        "--history-len",
        str(max(200, cfg.uplink_items, tcfg.windows.summary_items, cfg.refine.positions + 1)),
        "--max-weight-norm", repr(float(bounds["device_max_weight_norm"])),
        "--max-bias-abs", repr(float(bounds["device_max_bias_abs"])),
        "--max-probes", str(max(1000, cfg.negatives + 1)),
        "--rank-batch", "1", "--rank-wait-ms", "0", "--torch-threads", "1",
        "--gate-window", str(cfg.gate_window), "--gate-min-history", str(cfg.min_history),
        "--gate-min-gap", str(cfg.gate_min_gap),
    ]  # fmt: skip
    key = trigger_key(spec) if spec is not None else ("arms", 0.0)
    if key is None:  # static: no cloud at all
        return argv
    kind, value = key
    if kind == "timer":  # period value: the device's timer asks every round(1 / budget)
        argv += ["--gate-trigger", "timer", "--gate-budget", repr(1.0 / value)]
    elif kind == "gate":
        argv += ["--gate-trigger", "gate", "--gate-budget", repr(value)]
        argv += ["--gate-threshold", repr(float(thresholds[value]))]
    if cloud_target is None:
        raise ValidationError("a device that requests edits needs the cloud's address")
    argv += [
        "--cloud", cloud_target, "--cloud-deadline", str(cloud_deadline_s),
        "--probe-interval", "2", "--payload-dtype", cfg.payload_dtype,
        "--recent-items", str(cfg.uplink_items),
        "--summary-items", str(tcfg.windows.summary_items),
    ]  # fmt: skip
    if not int(art["adaptor_config"].get("summary_dim", 0)):
        argv.append("--no-summary")
    if spec is not None and spec.refine:
        argv += ["--uplink-states", str(cfg.refine.positions), "--state-dtype", REFINE_STATE_DTYPE]
    return argv


@contextlib.contextmanager
def server(
    argv: list[str], name: str, tmp: Path, info: dict[str, Any], timeout_s: float = 600.0
) -> Iterator[ServerProcess]:
    """A ``recsys`` server child process, started and listening within ``timeout_s`` (its
    port known; its models may still load: :func:`wait_ready`). On exit it is stopped
    gracefully (SIGTERM) and ``info["exit_code"]`` set; its log is ``tmp/<name>.log``."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    proc = ServerProcess(argv, name=name, log_path=tmp / f"{safe}.log")
    info["t0"] = time.perf_counter()
    proc.start()
    try:
        proc.wait_port(timeout=timeout_s)
        yield proc
    finally:
        info["exit_code"] = proc.stop()
        info.pop("t0", None)
        proc.close()


def wait_ready(proc: ServerProcess, timeout_s: float, info: dict[str, Any]) -> None:
    """Wait until ``proc`` answers SERVING; ``info["startup_s"]``: seconds since start."""
    proc.wait_ready(timeout=timeout_s)
    if "startup_s" not in info:
        info["startup_s"] = round(time.perf_counter() - info["t0"], 2)


def display_argv(argv: Sequence[str], tmp: Path, cache: Path) -> list[str]:
    """Server arguments without machine-specific paths (TMP/..., CACHE/...)."""
    out = []
    for a in argv:
        a = a.replace(str(tmp), "TMP")
        a = a.replace(str(Path(cache).resolve()), "CACHE").replace(str(cache), "CACHE")
        out.append(a)
    return out


__all__ = [
    "GRPC_KINDS",
    "REFINE_STATE_DTYPE",
    "check_grpc_policies",
    "cloud_argv",
    "device_argv",
    "display_argv",
    "frozen_artifact",
    "live_artifact",
    "live_cloud_argv",
    "server",
    "wait_ready",
]
