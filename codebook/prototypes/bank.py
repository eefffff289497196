"""The prototype bank: prototypes in memory, every change a version in the store.

:meth:`PrototypeBank.create` stores fitted centroids as version 1 (reason "init");
:meth:`PrototypeBank.observe` assigns devices, folds every ``refine_every`` member codes
into one new version (reason "refine", through the store's concurrent-safe
``refine_prototype``) and spawns a prototype when a prototype's recent members are
persistently far from it (reason "spawn"). See :mod:`codebook.prototypes` for the
lifecycle and :mod:`codebook.prototypes.algebra` for the edit maths.

Shape letters: C code width, P prototypes.

Example::

    bank = PrototypeBank.create(store, centroids, decode, spec, cfg, bound=2.0,
                                bias_bound=0.1, train_codes=codes)
    pid = bank.assign(code)                           # nearest prototype, code [C]
    residual, norm = bank.residual(user_edit, pid)
    bank.observe("device-7", code, norm, pid)         # maybe new versions / spawns
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from codebook.adaptor import HeadSpec, head_spec
from codebook.prototypes.algebra import DecodeFn, prototype_edits, residual_edit
from codebook.prototypes.config import PrototypeConfig
from codebook.quantizer import nearest
from codebook.store import PrototypeStore, VersionContent, VersionRef
from recsys.errors import ValidationError

logger = logging.getLogger(__name__)


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
        member_counts: np.ndarray | None = None,
        spawn_threshold: float | None = None,
    ) -> PrototypeBank:
        """Store every centroid as a new prototype (version 1, reason "init").

        ``train_codes`` [U, C] give member counts; with ``train_edits`` (codes -> their
        unbatched flat edits) the training residual norms are measured too, which set
        ``spawn_threshold`` when the config leaves it None. Without codes,
        ``member_counts`` [P] and ``spawn_threshold`` (e.g. an artefact's) say the same.
        """
        bank = cls(store, decode, spec, cfg, bound=bound, bias_bound=bias_bound)
        cents = np.asarray(centroids, dtype=np.float32)
        protos = bank._decode(cents)
        sizes = np.zeros(len(cents), dtype=np.int64)
        if member_counts is not None:
            sizes = np.asarray(member_counts, dtype=np.int64).reshape(len(cents))
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
        threshold = cfg.spawn_threshold if spawn_threshold is None else spawn_threshold
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
