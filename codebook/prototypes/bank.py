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

Write-behind (the cloud server): with a :class:`codebook.store.writer.StoreWriter`
attached (:meth:`PrototypeBank.attach_writer`), ``observe`` writes nothing itself: the
device assignment, the refinement (its update function still runs inside the store's
locked transaction on the LATEST stored version, so concurrent refiners lose no update)
and a spawn are queued to the writer; their committed versions come back to the bank and
are installed at the next :meth:`PrototypeBank.apply_written` (the engine calls it at
the start of every batch), so the bank only ever serves committed versions.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict, deque
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
from codebook.store.writer import WriteOp
from recsys.errors import ValidationError

logger = logging.getLogger(__name__)

MAX_TRACKED_DEVICES = 100_000  # device assignments remembered in memory (LRU)


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
        # device -> prototype it is stored as assigned to (LRU, at most max_tracked
        # devices: a device evicted from it is written again on its next edit, an
        # idempotent upsert)
        self._assigned: OrderedDict[str, int] = OrderedDict()
        self.max_tracked = MAX_TRACKED_DEVICES
        self.changes: list[BankChange] = []
        self.writer: Any | None = None  # a StoreWriter (write-behind) or None (write here)
        self._written: list[tuple[str, Any, Any]] = []  # (kind, state, extra) to install
        self._written_lock = threading.Lock()
        self._spawning = 0  # spawns queued, not yet installed

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
        contents, protos = bank._initial_versions(
            cents, train_codes, train_edits, member_counts, spawn_threshold
        )
        for k, content in enumerate(contents):
            state = store.create_prototype(f"{cfg.name_prefix}-{k}", content)
            bank.live[state.prototype_id] = _Live(
                state.prototype_id, state.version, cents[k].copy(), content.member_count or 0,
                protos[k],
            )  # fmt: skip
        logger.info("stored %d prototypes (spawn threshold %.4f)", len(cents), bank.spawn_threshold)
        return bank

    def _initial_versions(
        self,
        cents: np.ndarray,
        train_codes: np.ndarray | None,
        train_edits: Callable[[np.ndarray], list[Mapping[str, torch.Tensor]]] | None,
        member_counts: np.ndarray | None,
        spawn_threshold: float | None,
    ) -> tuple[list[VersionContent], list[dict[str, torch.Tensor]]]:
        """Version-1 contents of the centroids ``cents`` [P, C] and their clipped edits;
        sets :attr:`spawn_threshold` (see :meth:`create` for the arguments)."""
        protos = self._decode(cents)
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
                    _, n = self.residual_from(e, protos[k])
                    norms_by[k].append(n)
        all_norms = [n for ns in norms_by for n in ns]
        threshold = self.cfg.spawn_threshold if spawn_threshold is None else spawn_threshold
        if threshold is None:
            q = self.cfg.spawn_quantile
            threshold = float(np.quantile(all_norms, q)) if all_norms else math.inf
        self.spawn_threshold = float(threshold)
        contents = [
            VersionContent(
                code=code,
                tensors=_np(protos[k]),
                member_count=int(sizes[k]),
                residual_norm_mean=float(np.mean(norms_by[k])) if norms_by[k] else 0.0,
                residual_norm_max=float(np.max(norms_by[k])) if norms_by[k] else 0.0,
            )
            for k, code in enumerate(cents)
        ]
        return contents, protos

    @classmethod
    def load_or_create(
        cls,
        store: PrototypeStore,
        decode: DecodeFn,
        spec: Mapping[str, tuple[int, int]] | HeadSpec,
        cfg: PrototypeConfig,
        *,
        bound: float,
        bias_bound: float,
        fit: Callable[[], Mapping[str, Any]],
        spawn_threshold: float = math.inf,
    ) -> tuple[PrototypeBank, bool]:
        """The prototypes named ``{name_prefix}-*`` in ``store``; on a store without any,
        first the ones :meth:`create` would store from ``fit()``'s keyword arguments
        (``centroids`` [P, C], and optionally ``train_codes``, ``train_edits``,
        ``member_counts``, ``spawn_threshold``).

        Safe for replicas starting together on one empty store: exactly one of them
        calls ``fit()`` and stores the prototypes (one transaction, under the store's
        start-up lock, :meth:`PrototypeStore.seed_prototypes`); the others wait and load
        the same set. Every caller's bank holds the stored versions. ``spawn_threshold``
        is the loaded bank's; the creating one's comes from ``fit()`` as in
        :meth:`create`. Returns (bank, whether this call created the prototypes).
        """
        bank = cls(
            store, decode, spec, cfg, bound=bound, bias_bound=bias_bound,
            spawn_threshold=spawn_threshold,
        )  # fmt: skip

        def make() -> list[tuple[str, VersionContent]]:
            kw = dict(fit())
            cents = np.asarray(kw.pop("centroids"), dtype=np.float32)
            contents, _ = bank._initial_versions(
                cents,
                kw.pop("train_codes", None),
                kw.pop("train_edits", None),
                kw.pop("member_counts", None),
                kw.pop("spawn_threshold", None),
            )
            if kw:
                raise ValidationError(f"fit() returned unknown arguments {sorted(kw)}")
            return [(f"{cfg.name_prefix}-{k}", c) for k, c in enumerate(contents)]

        states, created = store.seed_prototypes(cfg.name_prefix, make)
        if not created:
            bank.spawn_threshold = float(spawn_threshold)
        for st in states:
            bank._install_state(st)
        logger.info(
            "%s %d prototypes %s-* (spawn threshold %.4f)",
            "stored" if created else "loaded", len(states), cfg.name_prefix,
            bank.spawn_threshold,
        )  # fmt: skip
        return bank, created

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
            bank._install_state(store.get_prototype(info.id))
        if not bank.live:
            raise ValidationError(f"no prototypes named {cfg.name_prefix}-* in the store")
        return bank

    def _install_state(self, st: Any) -> None:
        """Serve the stored state ``st`` (a ``PrototypeState``) as a live prototype."""
        tensors = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in st.tensors.items()}
        self.live[st.prototype_id] = _Live(
            st.prototype_id, st.version, st.code.astype(np.float32), st.member_count, tensors
        )

    # ---- write-behind -------------------------------------------------------------------
    def attach_writer(self, writer: Any) -> None:
        """Queue every store write to ``writer`` (a ``StoreWriter``) from now on."""
        self.writer = writer

    def _written_back(self, kind: str, extra: Any = None) -> Callable[[Any], None]:
        """The writer's ``done`` callback: keep the committed state for :meth:`apply_written`."""

        def done(state: Any) -> None:
            with self._written_lock:
                self._written.append((kind, state, extra))

        return done

    def apply_written(self) -> list[BankChange]:
        """Install the versions and prototypes the writer committed since the last call
        (call it from the thread that uses the bank)."""
        with self._written_lock:
            written, self._written = self._written, []
        out = []
        for kind, state, extra in written:
            if kind == "refine":
                live = self.live.get(state.prototype_id)
                if live is not None and state.version > live.version:
                    self._install(live, state)
                out.append(BankChange("refine", state.prototype_id, state.version))
            elif kind == "spawn_lost":
                self._spawning -= 1
            else:  # spawn: extra = (tensors, member count, parent)
                tensors, count, parent = extra
                self._spawning -= 1
                self.live[state.prototype_id] = _Live(
                    state.prototype_id, state.version, state.code.astype(np.float32), count,
                    tensors,
                )  # fmt: skip
                out.append(BankChange("spawn", state.prototype_id, state.version, parent))
        self.changes.extend(out)
        return out

    def _spawn_lost(self, why: str) -> None:
        with self._written_lock:
            self._written.append(("spawn_lost", None, None))

    @staticmethod
    def _install(live: _Live, state: Any) -> None:
        live.version = state.version
        live.code = state.code.astype(np.float32)
        live.count = state.member_count
        live.tensors = {
            k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.tensors.items()
        }

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

        The device's assignment is written to the store when it changes (queued to the
        writer when one is attached; then refinements and spawns are queued too and show
        up after :meth:`apply_written`, so the returned list is empty).
        """
        live = self.live[prototype_id]
        code = np.asarray(code, np.float32)
        if self._assigned.get(device_id) != prototype_id:
            self._assign(device_id, prototype_id, live.version)
        self._assigned.move_to_end(device_id)
        while len(self._assigned) > self.max_tracked:
            self._assigned.popitem(last=False)
        live.pending_codes.append(code)
        live.pending_norms.append(float(residual_norm))
        live.recent.append((float(residual_norm), code))
        while len(live.recent) > self.cfg.spawn_window:
            live.recent.popleft()
        out: list[BankChange] = []
        if len(live.pending_codes) >= self.cfg.refine_every:
            refined = self._refine(live)
            if refined is not None:
                out.append(refined)
        spawned = self._maybe_spawn(live)
        if spawned is not None:
            out.append(spawned)
        self.changes.extend(out)
        return out

    def _assign(self, device_id: str, prototype_id: int, version: int) -> None:
        self._assigned[device_id] = prototype_id
        if self.writer is None:
            self.store.assign_device(device_id, prototype_id, seen_version=version)
            return
        from codebook.store.repository import DeviceRepository

        self.writer.submit(
            WriteOp("assignment", apply=lambda session: DeviceRepository(session).assign(
                device_id, prototype_id, version
            ))
        )  # fmt: skip

    def _refine(self, live: _Live) -> BankChange | None:
        pending = np.stack(live.pending_codes)  # [k, C]
        norms = np.asarray(live.pending_norms)
        cap = self.cfg.max_count

        def update(latest):  # runs inside the store's transaction on the LATEST version
            n = min(int(latest.member_count), cap)
            k = len(pending)
            new_code = (n * latest.code.astype(np.float64) + pending.sum(0)) / (n + k)
            new_code = new_code.astype(np.float32)
            with torch.no_grad():  # grad mode is per thread: the writer's is on
                tensors = _np(self._decode(new_code[None])[0])
            return VersionContent(
                code=new_code,
                tensors=tensors,
                member_count=int(latest.member_count) + k,
                residual_norm_mean=float(norms.mean()),
                residual_norm_max=float(norms.max()),
            )

        pid = live.prototype_id
        if self.writer is not None:  # the members go with the queued refinement
            live.pending_codes.clear()
            live.pending_norms.clear()
            self.writer.submit(
                WriteOp("refinement", run=lambda store: store.refine_prototype(pid, update),
                        done=self._written_back("refine"))
            )  # fmt: skip
            return None
        state = self.store.refine_prototype(pid, update)  # raises: the members stay pending
        self._install(live, state)
        live.pending_codes.clear()
        live.pending_norms.clear()
        return BankChange("refine", live.prototype_id, state.version)

    def _maybe_spawn(self, live: _Live) -> BankChange | None:
        cfg = self.cfg
        if (
            len(live.recent) < cfg.spawn_window
            or len(self.live) + self._spawning >= cfg.max_prototypes
        ):
            return None
        far = [c for n, c in live.recent if n > self.spawn_threshold]
        if len(far) < cfg.spawn_fraction * cfg.spawn_window:
            return None
        code = np.mean(np.stack(far), axis=0).astype(np.float32)
        tensors = self._decode(code[None])[0]
        parent = VersionRef(live.prototype_id, live.version)
        content = VersionContent(
            code=code,
            tensors=_np(tensors),
            member_count=len(far),
            residual_norm_mean=float(np.mean([n for n, _ in live.recent])),
            residual_norm_max=float(max(n for n, _ in live.recent)),
        )
        first_name = f"{cfg.name_prefix}-{len(self.live) + self._spawning}"
        live.recent.clear()
        if self.writer is not None:
            self._spawning += 1
            self.writer.submit(
                WriteOp("spawn", run=lambda store: _create(store, first_name, content, parent),
                        done=self._written_back("spawn", (tensors, len(far), parent)),
                        lost=self._spawn_lost)
            )  # fmt: skip
            logger.info("spawn from %d/%d far members of prototype %d queued (threshold %.3f)",
                        len(far), cfg.spawn_window, live.prototype_id, self.spawn_threshold)  # fmt: skip
            return None
        state = _create(self.store, first_name, content, parent)
        self.live[state.prototype_id] = _Live(
            state.prototype_id, state.version, code, len(far), tensors
        )
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


def _create(store: PrototypeStore, name: str, content: VersionContent, parent: VersionRef) -> Any:
    """Create a spawned prototype under ``name`` (or ``name+``, ``name++``... if taken)."""
    while store.find_prototype(name) is not None:
        name += "+"
    return store.create_prototype(name, content, reason="spawn", parent=parent)


def _np(tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().float().numpy() for k, v in tensors.items()}
