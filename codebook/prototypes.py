"""Prototypes of edits: k-means over edit codes, online refinement, versions in the store.

Devices with similar behaviour share a **prototype**: an edit code (the generator's
code space, see :mod:`codebook.adaptor`) and the bounded head edit decoded from it. A
device's head is ``base + prototype edit + its own bounded residual``:

* prototype edit ``P = clip(decode(c_p), (1 - rho) * bound)``;
* residual ``R = clip(rank-R_res SVD of (E_u - P), rho * bound)`` where ``E_u`` is the
  device's own generated edit (low-rank U diag(s) V^T plus bias),

so ``||P + R||_F <= bound`` per layer whatever prototype version the device holds (the
triangle inequality), and the device checks exactly that bound. The downlink of one edit
is the residual plus (prototype id, version); a prototype's own tensors are fetched once
per version ("what changed since version v").

Lifecycle:

1. :func:`fit_prototypes`: faiss k-means of the training users' edit codes (one per
   training window) into P centroids; :meth:`PrototypeBank.create` stores each as
   version 1 (reason "init") with its decoded edit tensors, member count and residual
   statistics.
2. Online, as edits arrive (:meth:`PrototypeBank.observe`): the device is assigned to
   the nearest prototype code; the prototype's code follows the running mean of its
   members' codes (``c <- (n c + sum of new codes) / (n + k)``, n capped at
   ``max_count`` so it keeps adapting); every ``refine_every`` member edits become ONE
   new version (reason "refine") through :meth:`codebook.store.PrototypeStore.refine_prototype`,
   whose update reads the latest stored version, so concurrent refiners lose nothing.
3. Spawn: when at least ``spawn_fraction`` of a prototype's last ``spawn_window``
   members had a residual norm above ``spawn_threshold`` (default: the
   ``spawn_quantile`` of the training residual norms), a new prototype is created
   (reason "spawn", parent = that version) at the mean code of those far members.

Shape letters: U codes, C code width, P prototypes, R rank.

Example::

    centroids, info = fit_prototypes(codes, PrototypeConfig(num_prototypes=16))
    bank = PrototypeBank.create(store, centroids, decode, spec, cfg, bound=2.0,
                                bias_bound=0.1, train_codes=codes)
    pid = bank.assign(code)                           # nearest prototype
    version, proto_edit = bank.edit(pid)              # flat tensors, version
    residual, norm = bank.residual(user_edit, pid)    # flat, bounded by rho * bound
    changes = bank.observe("device-7", code, norm, pid)   # maybe new versions / spawns
    store.changes_since(pid, version)                 # what changed since version v
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from codebook.adaptor import HeadSpec, head_spec, lowrank_norm
from codebook.quantizer import kmeans, limited_threads, nearest
from codebook.store import PrototypeStore, VersionContent, VersionRef
from recsys.errors import ValidationError

logger = logging.getLogger(__name__)

DecodeFn = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]  # codes [P, C] -> batched flat


@dataclass(frozen=True)
class PrototypeConfig:
    """Prototype clustering and online refinement.

    Example::

        PrototypeConfig(num_prototypes=16, residual_share=0.5, refine_every=20)
    """

    num_prototypes: int = 16  # P at start (k-means); spawning may add more
    kmeans_iters: int = 25
    residual_share: float = 0.5  # rho: share of the bound left to a device's own residual
    residual_rank: int = 4  # rank of the residual sent to a device (held-out: 2-4 match rank 8)
    refine_every: int = 20  # member edits folded into one new version
    max_count: int = 1000  # running-mean count cap: later codes keep a weight >= 1/max_count
    spawn_threshold: float | None = None  # residual norm that counts as "far"; None: quantile
    spawn_quantile: float = 0.95  # of the training residual norms, when threshold is None
    spawn_window: int = 40  # last member edits a spawn decision looks at
    spawn_fraction: float = 0.75  # share of them above the threshold that triggers a spawn
    max_prototypes: int = 64  # never spawn beyond this
    seed: int = 0
    name_prefix: str = "proto"  # prototype names: f"{prefix}-{index}"

    def __post_init__(self) -> None:
        if self.num_prototypes < 1 or self.residual_rank < 1 or self.refine_every < 1:
            raise ValidationError("num_prototypes, residual_rank, refine_every must be >= 1")
        if not 0.0 <= self.residual_share < 1.0:
            raise ValidationError(f"residual_share must be in [0, 1), got {self.residual_share}")
        if self.spawn_window < 1 or not 0.0 < self.spawn_fraction <= 1.0:
            raise ValidationError("spawn_window >= 1 and spawn_fraction in (0, 1] required")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_prototypes(codes: np.ndarray, cfg: PrototypeConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """faiss k-means of edit codes.

    Args:
        codes: float [U, C].

    Returns:
        (centroids float32 [P, C], info: sizes [P], inertia, P).
    """
    x = np.ascontiguousarray(np.asarray(codes, dtype=np.float32))
    if x.ndim != 2 or len(x) < cfg.num_prototypes:
        raise ValidationError(
            f"need at least {cfg.num_prototypes} codes [U, C] to fit prototypes, got {x.shape}"
        )
    if not np.isfinite(x).all():
        raise ValidationError("edit codes contain NaN or Inf")
    with limited_threads(1):
        centroids = kmeans(x, cfg.num_prototypes, seed=cfg.seed, niter=cfg.kmeans_iters)
    assign = nearest(x, centroids)
    sizes = np.bincount(assign, minlength=cfg.num_prototypes)
    inertia = float(((x - centroids[assign]) ** 2).sum(axis=1).mean())
    return centroids, {"sizes": sizes.tolist(), "inertia": inertia, "prototypes": len(centroids)}


def nearest_prototype(codes: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid for each code: [U, C], [P, C] -> int64 [U]."""
    return nearest(np.asarray(codes, np.float32), np.asarray(centroids, np.float32))


# ---- edit algebra (cloud side, plain tensors) ------------------------------------------
def layer_names(spec: HeadSpec) -> list[str]:
    return [n for n, _, _ in spec]


def dense_delta(flat: Mapping[str, torch.Tensor], name: str) -> torch.Tensor | None:
    """dW [out, in] of one layer of an unbatched flat edit (low-rank + dense parts)."""
    dw = None
    if f"{name}.u" in flat:
        u, s, v = flat[f"{name}.u"].float(), flat[f"{name}.s"].float(), flat[f"{name}.v"].float()
        dw = (u * s) @ v.T
    if f"{name}.dense" in flat:
        dw = flat[f"{name}.dense"].float() if dw is None else dw + flat[f"{name}.dense"].float()
    return dw


def clip_lowrank(
    flat: Mapping[str, torch.Tensor], spec: HeadSpec, bound: float, bias_bound: float
) -> dict[str, torch.Tensor]:
    """Hard-clip an unbatched low-rank flat edit: scale s so ``||dW||_F <= bound`` per layer
    and clamp the bias to ``[-bias_bound, bias_bound]``."""
    out = dict(flat)
    for name in layer_names(spec):
        if f"{name}.u" in flat:
            u, s, v = flat[f"{name}.u"], flat[f"{name}.s"], flat[f"{name}.v"]
            norm = float(lowrank_norm(u[None], s[None], v[None])[0])
            if norm > bound:
                out[f"{name}.s"] = s * (bound / norm)
        if f"{name}.bias" in flat:
            out[f"{name}.bias"] = flat[f"{name}.bias"].clamp(-bias_bound, bias_bound)
    return out


def residual_edit(
    user: Mapping[str, torch.Tensor],
    proto: Mapping[str, torch.Tensor],
    spec: HeadSpec,
    *,
    rank: int,
    bound: float,
    bias_bound: float,
) -> tuple[dict[str, torch.Tensor], float]:
    """The device's residual ``user - proto`` as a rank-``rank`` edit, clipped.

    dW per layer is formed densely (a [out, in] matrix; cloud side), truncated by SVD to
    ``rank`` (U and V orthonormal, so ``||dW_R||_F = ||s||_2``, clipped exactly), bias
    differences clamped.

    Returns:
        (flat residual, norm): norm = sqrt(sum over layers of ||dW_l||_F^2 + ||db_l||^2)
        of the exact difference, before truncation and clipping (the spawn signal).
    """
    out: dict[str, torch.Tensor] = {}
    total = 0.0
    for name, o, i in spec:
        du, dp = dense_delta(user, name), dense_delta(proto, name)
        if du is None and dp is None:
            continue
        diff = (du if du is not None else 0.0) - (dp if dp is not None else torch.zeros(o, i))
        total += float((diff**2).sum())
        uu, ss, vh = torch.linalg.svd(diff, full_matrices=False)
        r = min(rank, ss.shape[0])
        s = ss[:r]
        norm = float(s.norm())
        if norm > bound:
            s = s * (bound / norm)
        out[f"{name}.u"], out[f"{name}.s"], out[f"{name}.v"] = (
            uu[:, :r].contiguous(),
            s.contiguous(),
            vh[:r].T.contiguous(),
        )
        bu, bp = user.get(f"{name}.bias"), proto.get(f"{name}.bias")
        if bu is not None or bp is not None:
            db = (bu if bu is not None else torch.zeros(o)) - (
                bp if bp is not None else torch.zeros(o)
            )
            total += float((db**2).sum())
            out[f"{name}.bias"] = db.clamp(-bias_bound, bias_bound)
    return out, math.sqrt(total)


def prototype_edits(
    decode: DecodeFn,
    codes: np.ndarray,
    spec: HeadSpec,
    cfg: PrototypeConfig,
    bound: float,
    bias_bound: float,
) -> list[dict[str, torch.Tensor]]:
    """Prototype codes [P, C] -> P unbatched flat edits, clipped to ``(1 - rho)`` of the
    device bounds (so that any residual within ``rho`` of them keeps the sum in bounds)."""
    with torch.no_grad():
        batched = decode(torch.from_numpy(np.asarray(codes, np.float32)))
    share = 1.0 - cfg.residual_share
    return [
        clip_lowrank(
            {k: v[p].detach().float() for k, v in batched.items()},
            spec,
            share * bound,
            share * bias_bound,
        )
        for p in range(len(codes))
    ]


# ---- the bank ----------------------------------------------------------------------------
@dataclass
class _Live:
    """In-memory state of one prototype between versions."""

    prototype_id: int
    version: int
    code: np.ndarray  # [C]
    count: int
    tensors: dict[str, torch.Tensor]  # clipped prototype edit (flat, unbatched)
    pending_codes: list[np.ndarray] = field(default_factory=list)
    pending_norms: list[float] = field(default_factory=list)
    recent: deque = field(default_factory=deque)  # (norm, code) of the last members


@dataclass
class BankChange:
    """One change made by :meth:`PrototypeBank.observe` (for logs and reports)."""

    kind: str  # "refine" or "spawn"
    prototype_id: int
    version: int
    parent: VersionRef | None = None


class PrototypeBank:
    """Prototypes in memory, every change persisted as a version in a
    :class:`codebook.store.PrototypeStore`.

    Args:
        store: an open store (schema migrated).
        decode: the generator's decoder, codes [P, C] -> batched flat edits.
        spec: head spec (layers in order).
        cfg: :class:`PrototypeConfig`.
        bound: the device's ||dW||_F bound per layer; prototype edits get
            ``(1 - rho) * bound``, residuals ``rho * bound``.
        bias_bound: the device's |db| bound, shared the same way.
        spawn_threshold: resolved threshold (see :meth:`create`).
    """

    def __init__(
        self,
        store: PrototypeStore,
        decode: DecodeFn,
        spec: Mapping[str, tuple[int, int]] | HeadSpec,
        cfg: PrototypeConfig,
        *,
        bound: float,
        bias_bound: float,
        spawn_threshold: float = math.inf,
    ) -> None:
        self.store = store
        self.decode_fn = decode
        self.spec = head_spec(spec)
        self.cfg = cfg
        self.bound = float(bound)
        self.bias_bound = float(bias_bound)
        self.spawn_threshold = float(spawn_threshold)
        self.live: dict[int, _Live] = {}
        self._assigned: dict[str, int] = {}
        self.changes: list[BankChange] = []

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        store: PrototypeStore,
        centroids: np.ndarray,
        decode: DecodeFn,
        spec: Mapping[str, tuple[int, int]] | HeadSpec,
        cfg: PrototypeConfig,
        *,
        bound: float,
        bias_bound: float,
        train_codes: np.ndarray | None = None,
        train_edits: Callable[[np.ndarray], list[Mapping[str, torch.Tensor]]] | None = None,
    ) -> PrototypeBank:
        """Store every centroid as a new prototype (version 1, reason "init").

        ``train_codes`` [U, C] give member counts; with ``train_edits`` (codes -> their
        unbatched flat edits) the training residual norms are measured too, which set
        ``spawn_threshold`` when the config leaves it None.
        """
        bank = cls(store, decode, spec, cfg, bound=bound, bias_bound=bias_bound)
        cents = np.asarray(centroids, dtype=np.float32)
        protos = bank._decode(cents)
        sizes = np.zeros(len(cents), dtype=np.int64)
        norms_by: list[list[float]] = [[] for _ in cents]
        if train_codes is not None and len(train_codes):
            assign = nearest(np.asarray(train_codes, np.float32), cents)
            sizes = np.bincount(assign, minlength=len(cents))
            if train_edits is not None:
                edits = train_edits(np.asarray(train_codes, np.float32))
                for k, e in zip(assign.tolist(), edits, strict=True):
                    _, n = bank.residual_from(e, protos[k])
                    norms_by[k].append(n)
        all_norms = [n for ns in norms_by for n in ns]
        threshold = cfg.spawn_threshold
        if threshold is None:
            threshold = float(np.quantile(all_norms, cfg.spawn_quantile)) if all_norms else math.inf
        bank.spawn_threshold = float(threshold)
        for k, code in enumerate(cents):
            ns = norms_by[k]
            state = store.create_prototype(
                f"{cfg.name_prefix}-{k}",
                VersionContent(
                    code=code,
                    tensors=_np(protos[k]),
                    member_count=int(sizes[k]),
                    residual_norm_mean=float(np.mean(ns)) if ns else 0.0,
                    residual_norm_max=float(np.max(ns)) if ns else 0.0,
                ),
            )
            bank.live[state.prototype_id] = _Live(
                state.prototype_id, state.version, code.copy(), int(sizes[k]), protos[k]
            )
        logger.info("stored %d prototypes (spawn threshold %.4f)", len(cents), bank.spawn_threshold)
        return bank

    @classmethod
    def load(
        cls,
        store: PrototypeStore,
        decode: DecodeFn,
        spec: Mapping[str, tuple[int, int]] | HeadSpec,
        cfg: PrototypeConfig,
        *,
        bound: float,
        bias_bound: float,
        spawn_threshold: float = math.inf,
    ) -> PrototypeBank:
        """The prototypes named ``{name_prefix}-*`` already in ``store``, at their current
        versions."""
        bank = cls(
            store,
            decode,
            spec,
            cfg,
            bound=bound,
            bias_bound=bias_bound,
            spawn_threshold=spawn_threshold,
        )
        for info in store.list_prototypes():
            if not info.name.startswith(f"{cfg.name_prefix}-"):
                continue
            st = store.get_prototype(info.id)
            tensors = {
                k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in st.tensors.items()
            }
            bank.live[info.id] = _Live(
                info.id, st.version, st.code.astype(np.float32), st.member_count, tensors
            )
        if not bank.live:
            raise ValidationError(f"no prototypes named {cfg.name_prefix}-* in the store")
        return bank

    # ---- queries ----------------------------------------------------------------------
    def _decode(self, codes: np.ndarray) -> list[dict[str, torch.Tensor]]:
        """Codes [P, C] -> P clipped prototype edits (unbatched flat)."""
        return prototype_edits(
            self.decode_fn, codes, self.spec, self.cfg, self.bound, self.bias_bound
        )

    @property
    def prototype_ids(self) -> list[int]:
        return sorted(self.live)

    def codes(self) -> tuple[list[int], np.ndarray]:
        """(prototype ids, current codes [P, C])."""
        ids = self.prototype_ids
        return ids, np.stack([self.live[i].code for i in ids])

    def assign(self, code: np.ndarray) -> int:
        """The prototype whose current code is nearest ``code`` [C]."""
        ids, cents = self.codes()
        return ids[int(nearest(np.asarray(code, np.float32)[None], cents)[0])]

    def edit(self, prototype_id: int) -> tuple[int, dict[str, torch.Tensor]]:
        """(current version, the prototype's flat edit)."""
        live = self.live[prototype_id]
        return live.version, live.tensors

    def residual_from(
        self, user: Mapping[str, torch.Tensor], proto: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], float]:
        rho = self.cfg.residual_share
        return residual_edit(
            user,
            proto,
            self.spec,
            rank=self.cfg.residual_rank,
            bound=rho * self.bound,
            bias_bound=rho * self.bias_bound,
        )

    def residual(
        self, user: Mapping[str, torch.Tensor], prototype_id: int
    ) -> tuple[dict[str, torch.Tensor], float]:
        """The device residual against the prototype's current edit, and its norm."""
        return self.residual_from(user, self.live[prototype_id].tensors)

    # ---- online refinement -------------------------------------------------------------
    def observe(
        self, device_id: str, code: np.ndarray, residual_norm: float, prototype_id: int
    ) -> list[BankChange]:
        """Record one edit of ``device_id`` (code [C], its residual norm against
        ``prototype_id``); may append a version (refine) and/or spawn a prototype.

        The device's assignment is written to the store when it changes.
        """
        live = self.live[prototype_id]
        code = np.asarray(code, np.float32)
        if self._assigned.get(device_id) != prototype_id:
            self.store.assign_device(device_id, prototype_id, seen_version=live.version)
            self._assigned[device_id] = prototype_id
        live.pending_codes.append(code)
        live.pending_norms.append(float(residual_norm))
        live.recent.append((float(residual_norm), code))
        while len(live.recent) > self.cfg.spawn_window:
            live.recent.popleft()
        out: list[BankChange] = []
        if len(live.pending_codes) >= self.cfg.refine_every:
            out.append(self._refine(live))
        spawned = self._maybe_spawn(live)
        if spawned is not None:
            out.append(spawned)
        self.changes.extend(out)
        return out

    def _refine(self, live: _Live) -> BankChange:
        pending = np.stack(live.pending_codes)  # [k, C]
        norms = np.asarray(live.pending_norms)
        cap = self.cfg.max_count

        def update(latest):  # runs inside the store's transaction on the LATEST version
            n = min(int(latest.member_count), cap)
            k = len(pending)
            new_code = (n * latest.code.astype(np.float64) + pending.sum(0)) / (n + k)
            new_code = new_code.astype(np.float32)
            return VersionContent(
                code=new_code,
                tensors=_np(self._decode(new_code[None])[0]),
                member_count=int(latest.member_count) + k,
                residual_norm_mean=float(norms.mean()),
                residual_norm_max=float(norms.max()),
            )

        state = self.store.refine_prototype(live.prototype_id, update)
        live.version = state.version
        live.code = state.code.astype(np.float32)
        live.count = state.member_count
        live.tensors = {
            k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.tensors.items()
        }
        live.pending_codes.clear()
        live.pending_norms.clear()
        return BankChange("refine", live.prototype_id, state.version)

    def _maybe_spawn(self, live: _Live) -> BankChange | None:
        cfg = self.cfg
        if len(live.recent) < cfg.spawn_window or len(self.live) >= cfg.max_prototypes:
            return None
        far = [c for n, c in live.recent if n > self.spawn_threshold]
        if len(far) < cfg.spawn_fraction * cfg.spawn_window:
            return None
        code = np.mean(np.stack(far), axis=0).astype(np.float32)
        tensors = self._decode(code[None])[0]
        parent = VersionRef(live.prototype_id, live.version)
        name = f"{cfg.name_prefix}-{len(self.live)}"
        while self.store.find_prototype(name) is not None:
            name += "+"
        state = self.store.create_prototype(
            name,
            VersionContent(
                code=code,
                tensors=_np(tensors),
                member_count=len(far),
                residual_norm_mean=float(np.mean([n for n, _ in live.recent])),
                residual_norm_max=float(max(n for n, _ in live.recent)),
            ),
            reason="spawn",
            parent=parent,
        )
        self.live[state.prototype_id] = _Live(
            state.prototype_id, state.version, code, len(far), tensors
        )
        live.recent.clear()
        logger.info(
            "spawned prototype %d from %d/%d far members of prototype %d (threshold %.3f)",
            state.prototype_id,
            len(far),
            cfg.spawn_window,
            live.prototype_id,
            self.spawn_threshold,
        )
        return BankChange("spawn", state.prototype_id, state.version, parent)

    def changes_since(self, prototype_id: int, version: int):
        """What changed since ``version`` (store versions, oldest first)."""
        return self.store.changes_since(prototype_id, version)

    def summary(self) -> dict[str, Any]:
        return {
            "prototypes": len(self.live),
            "versions": {pid: lv.version for pid, lv in sorted(self.live.items())},
            "refinements": sum(c.kind == "refine" for c in self.changes),
            "spawned": sum(c.kind == "spawn" for c in self.changes),
            "spawn_threshold": self.spawn_threshold,
        }


def _np(tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().float().numpy() for k, v in tensors.items()}
