"""The cloud's adaptation engine: one object shared by the gRPC servicer and offline tools.

Like vLLM's one engine behind two front-ends, :class:`AdaptationEngine` is the interface
the :mod:`llm_cloud.service.servicer`, the replay evaluator and the CLI all use::

    generate_edits(requests: [B] EditRequest) -> [B] EditResult (or an exception per item)

:class:`ComposedEngine` implements it from the trained pieces:

1. **tokens**: the codebook LM's top-N next items for each history (an
   ``llm_cloud.backends`` backend: ``generate(histories, top_n)``, constrained to valid
   semantic IDs), or, when the adaptor was trained without an LM, the semantic IDs of
   the N most recent items (the same stand-in its training used);
2. **adaptor** (``codebook.adaptor.Adaptor``): semantic IDs ``[B, N, L+1]`` (+ LM scores
   ``[B, N]``, + the device summary ``[B, S]``) -> edit code ``[B, C]`` and a bounded
   low-rank head edit per user;
3. **prototypes** (``codebook.prototypes.PrototypeBank``): the nearest prototype, the
   device's residual against it (what goes down the wire, with the prototype id +
   version), online refinement of the prototype versions;
4. **store** (``codebook.store.PrototypeStore``): prototype versions, device
   assignments and the edit log (one write transaction per batch for the log). In the
   server, a write-behind :class:`codebook.store.writer.StoreWriter` is attached
   (:meth:`ComposedEngine.attach_writer`): the batch then answers from memory (the bank's
   committed versions, edit ids reserved ahead from the store's ``id_blocks``, see
   :class:`EditIds`) and queues its assignments, refinements and log rows to the writer,
   so a slow or locked database never delays or fails an edit;
5. **refinement** (optional, issue 13; :class:`EditRefiner`): a request that carries the
   device's recent user states (``states`` [P, D], and the item that followed each,
   ``targets`` [P]) gets the adaptor's edit refined by a few Adam steps of the
   fine-tuning objective on them (:func:`codebook.refine.refine_edits`, batched over the
   call's refining requests, users independent), sent whole: no prototype.

The whole batch runs in one call: the LM and the adaptor see B users at once, which is
what the servicer's micro-batching is for. Payloads use :mod:`recsys.edit_payload`.

Shapes: B requests, H history length, N generated items, L+1 semantic-ID levels,
S summary width, C edit-code width, P recent positions, D ranker width.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from recsys.adaptor_inputs import TokenSource, check_summary, item_codes, uplink_window
from recsys.edit_payload import DTYPES, encode_payload
from recsys.errors import NotFoundError, ValidationError
from recsys.serving.tracing import span

logger = logging.getLogger(__name__)

MAX_DEVICE_ID = 200
MAX_HISTORY = 512  # items per request (the LM reads the last max_history of them)
MAX_STATES = 512  # recent user states per request
MAX_STATE_DIM = 4096
STATE_DTYPES = {"fp16": np.dtype("<f2"), "fp32": np.dtype("<f4")}


# ---- requests and results ------------------------------------------------------------------
@dataclass(frozen=True)
class EditRequest:
    """One device's request, validated (see :func:`build_request`).

    Attributes:
        device_id: the device (user) id.
        history: int64 [H] item indices, oldest first (H >= 1).
        summary: float32 [S] device summary, or None.
        payload_dtype: "fp16", "int8" or "fp32".
        cached_prototype: (id, version) the device holds, or None.
        top_n: generated items the adaptor reads (None = the engine's N).
        states: float32 [P, D] the device's user states before its last P positions
            (oldest first), or None; targets: int64 [P] the item at each of them.
    """

    device_id: str
    history: np.ndarray
    summary: np.ndarray | None = None
    payload_dtype: str = "fp16"
    cached_prototype: tuple[int, int] | None = None
    top_n: int | None = None
    states: np.ndarray | None = None
    targets: np.ndarray | None = None


@dataclass(frozen=True)
class EditResult:
    """One device's edit.

    Attributes:
        payload: RSE1 bytes of the (residual) edit.
        edit_id: id in the edit log (increasing).
        prototype: (id, version) the residual is relative to, or None (absolute edit).
        prototype_payload: that prototype's own edit (RSE1) when the device lacks it.
        generated_items: item indices read by the adaptor, best / most recent first.
        tokens: their semantic-ID tokens, space separated.
        edit_norm: the residual's norm (or the edit's, without prototypes).
        batch_size: requests in the engine call that made it; engine_ms: that call's time.
        refined: the edit was refined on the request's states (absolute, no prototype).
    """

    payload: bytes
    edit_id: int
    prototype: tuple[int, int] | None = None
    prototype_payload: bytes | None = None
    generated_items: list[int] = field(default_factory=list)
    tokens: str = ""
    edit_norm: float = 0.0
    batch_size: int = 1
    engine_ms: float = 0.0
    refined: bool = False


@dataclass(frozen=True)
class PrototypeView:
    """A prototype version as the service shows it (payload only when asked for)."""

    prototype_id: int
    version: int
    name: str
    member_count: int
    created_at: datetime | None
    payload: bytes | None = None


@runtime_checkable
class AdaptationEngine(Protocol):
    """What the cloud service needs from an engine (see the module docstring)."""

    item_ids: Sequence[str]
    model_version: str | None  # ranker fingerprint the edits are made for (None: any)
    summary_dim: int  # S the adaptor reads (0: none)
    max_top_n: int  # largest N a request may ask for

    def generate_edits(self, requests: Sequence[EditRequest]) -> list[EditResult | Exception]:
        """One result (or an exception, raised to that caller only) per request, in order."""
        ...

    def get_prototype(
        self, prototype_id: int, version: int | None = None, dtype: str = "fp16"
    ) -> PrototypeView:
        """A prototype version with its edit payload (NotFoundError if unknown)."""
        ...

    def list_prototypes(self) -> list[PrototypeView]:
        """Every prototype at its current version, without payloads."""
        ...

    def info(self) -> dict[str, Any]:
        """What the engine runs (for logs and benchmark JSON)."""
        ...

    def close(self) -> None:
        """Release the LM backend and the store."""
        ...


def build_request(
    engine: AdaptationEngine,
    item_index: Mapping[str, int],
    *,
    device_id: str,
    item_ids: Sequence[str],
    timestamps: Sequence[int] = (),
    summary: Sequence[float] = (),
    model_version: str = "",
    payload_dtype: str = "fp16",
    cached_prototype: tuple[int, int] | None = None,
    top_n: int = 0,
    states: bytes | None = None,
    state_dim: int = 0,
    state_dtype: str | None = None,
    earlier_item_ids: Sequence[str] = (),
) -> EditRequest:
    """Validate a request against ``engine`` (the domain checks the servicer relies on).

    ``states`` (None = the request carries none): the device's recent user states as
    bytes, ``state_dim`` values per row in ``state_dtype`` ("fp16" | "fp32"), see
    :func:`parse_states`.

    Raises:
        ValidationError: empty/oversized ids or history, mismatched timestamps, NaN/Inf or
            wrong length in the summary, a foreign model version, a bad dtype or top_n,
            malformed states.
        NotFoundError: an unknown item id.
    """
    if not device_id.strip() or len(device_id) > MAX_DEVICE_ID:
        raise ValidationError(
            f"device_id must have 1..{MAX_DEVICE_ID} characters, not only spaces; got "
            f"{len(device_id)} characters"
        )
    if not item_ids:
        raise ValidationError("recent_item_ids is empty: send at least one recent item")
    if len(item_ids) > MAX_HISTORY:
        raise ValidationError(f"{len(item_ids)} recent items; the limit is {MAX_HISTORY}")
    if timestamps and len(timestamps) != len(item_ids):
        raise ValidationError(
            f"{len(timestamps)} timestamps for {len(item_ids)} items; send none or one per item"
        )
    history = _item_indices(item_index, item_ids, "recent_item_ids")
    vec = None
    if summary:
        vec = np.asarray(summary, dtype=np.float32)
        if engine.summary_dim:
            vec = check_summary(vec, engine.summary_dim)
        elif not np.isfinite(vec).all():
            raise ValidationError("the summary vector contains NaN or Inf")
    elif engine.summary_dim:
        raise ValidationError(
            f"this adaptor needs the device summary ({engine.summary_dim} floats: mean recent "
            "item embedding + user state)"
        )
    if engine.model_version and model_version and model_version != engine.model_version:
        raise ValidationError(
            f"the device runs ranker {model_version}, but the adaptor makes edits for ranker "
            f"{engine.model_version}; deploy the matching ranker"
        )
    if payload_dtype not in DTYPES:
        raise ValidationError(f"payload dtype {payload_dtype!r} is not one of {list(DTYPES)}")
    if not 0 <= top_n <= engine.max_top_n:
        raise ValidationError(f"top_n must be in 0..{engine.max_top_n}, got {top_n}")
    rows = targets = None
    if states is not None:
        rows, targets = parse_states(
            states,
            state_dim,
            state_dtype,
            _item_indices(item_index, earlier_item_ids, "earlier_item_ids"),
            history,
            int(getattr(engine, "state_dim", 0) or 0),
        )
    return EditRequest(
        device_id=device_id,
        history=history,
        summary=vec,
        payload_dtype=payload_dtype,
        cached_prototype=cached_prototype,
        top_n=top_n or None,
        states=rows,
        targets=targets,
    )


def _item_indices(item_index: Mapping[str, int], ids: Sequence[str], field: str) -> np.ndarray:
    """Item ids -> int64 indices (at most MAX_HISTORY; unknown: NotFoundError)."""
    if len(ids) > MAX_HISTORY:
        raise ValidationError(f"{len(ids)} {field}; the limit is {MAX_HISTORY}")
    out = np.empty(len(ids), dtype=np.int64)
    for n, item in enumerate(ids):
        idx = item_index.get(item)
        if idx is None:
            raise NotFoundError(f"unknown item {item[:100]!r} in {field} (position {n})")
        out[n] = idx
    return out


def parse_states(
    data: bytes,
    state_dim: int,
    dtype: str | None,
    earlier: np.ndarray,
    history: np.ndarray,
    expected_dim: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The device's recent user states -> (states float32 [P, D], targets int64 [P]).

    ``data`` holds P x ``state_dim`` little-endian values of ``dtype``, oldest position
    first; position k's target is item k of the last P of ``earlier ++ history``.

    Raises:
        ValidationError: an unknown dtype, a width other than ``expected_dim`` (when
            known) or outside 1..MAX_STATE_DIM, a byte count that is not a whole number of
            rows, no rows or more than MAX_STATES, NaN / Inf, fewer items than rows.
    """
    if dtype not in STATE_DTYPES:
        raise ValidationError(
            f"recent_states.dtype must be one of {list(STATE_DTYPES)} (got {dtype or 'unset'})"
        )
    if not 1 <= state_dim <= MAX_STATE_DIM:
        raise ValidationError(
            f"recent_states.state_dim must be in 1..{MAX_STATE_DIM}, got {state_dim}"
        )
    if expected_dim and state_dim != expected_dim:
        raise ValidationError(
            f"recent_states.state_dim is {state_dim}, but the cloud's ranker has width "
            f"{expected_dim}; send the device ranker's user states"
        )
    width = STATE_DTYPES[dtype].itemsize * state_dim
    if not data or len(data) % width:
        raise ValidationError(
            f"recent_states.states has {len(data)} bytes: not a whole, non-zero number of "
            f"rows of {state_dim} {dtype} values ({width} bytes each)"
        )
    p = len(data) // width
    if p > MAX_STATES:
        raise ValidationError(f"{p} recent states; the limit is {MAX_STATES}")
    rows = np.frombuffer(data, dtype=STATE_DTYPES[dtype]).reshape(p, state_dim)
    if not np.isfinite(rows).all():
        raise ValidationError("recent_states.states contains NaN or Inf")
    items = np.concatenate([earlier, history])  # [H']
    if p > len(items):
        raise ValidationError(
            f"{p} recent states need the {p} items that followed them, but the request "
            f"carries {len(items)} (recent_item_ids + recent_states.earlier_item_ids)"
        )
    return rows.astype(np.float32), items[len(items) - p :].copy()


# token sources: recsys.adaptor_inputs (RecentTokens, LMTokens), shared with training


# ---- refinement ---------------------------------------------------------------------------------
class EditRefiner:
    """Cloud-side refinement of the adaptor's edits on the devices' recent states.

    Args:
        head: the frozen ranker head and output layer (``codebook.refine.HeadTensors``).
        config: ``codebook.refine.RefineConfig`` (steps, lr, positions: a request's last
            ``positions`` states are used).
        bound / bias_bound: the refined edit's per-layer ``||dW||_F`` and ``|db|`` bounds
            (the generator's bounds: a margin inside the device's for payload rounding).
    """

    def __init__(self, head: Any, config: Any, *, bound: float, bias_bound: float) -> None:
        self.head = head
        self.config = config
        self.bound = float(bound)
        self.bias_bound = float(bias_bound)
        self.state_dim = int(head.item_table.shape[1])

    def refine(
        self,
        tensors: Mapping[str, torch.Tensor],
        requests: Sequence[EditRequest],
        rows: Sequence[int],
    ) -> dict[int, dict[str, torch.Tensor]]:
        """The batched edits ``tensors`` [B, ...] of the call's ``rows`` (whose
        ``requests`` carry states), refined together: row -> unbatched flat edit."""
        from codebook.refine import refine_edits

        p = self.config.positions
        states = torch.zeros(len(rows), p, self.state_dim)  # [R, P, D], padding after
        targets = torch.full((len(rows), p), -1, dtype=torch.int64)  # [R, P], -1 = padding
        for j, r in enumerate(requests):  # R requests, each one [<=P, D] copy
            s, t = r.states[-p:], r.targets[-p:]
            states[j, : len(s)] = torch.from_numpy(s)
            targets[j, : len(t)] = torch.from_numpy(t)
        sel = torch.as_tensor(list(rows), dtype=torch.int64)
        out = refine_edits(
            self.head,
            {k: v[sel] for k, v in tensors.items()},
            states,
            targets,
            self.config,
            bound=self.bound,
            bias_bound=self.bias_bound,
        )
        return {b: {k: v[j] for k, v in out.items()} for j, b in enumerate(rows)}

    def describe(self) -> dict[str, Any]:
        cfg = self.config
        return {"steps": cfg.steps, "lr": cfg.lr, "positions": cfg.positions,
                "bound": self.bound, "bias_bound": self.bias_bound}  # fmt: skip


# ---- edit ids under write-behind -------------------------------------------------------------
class EditIds:
    """Edit ids handed out before their log rows are written.

    Ids come from blocks reserved in the store (``PrototypeStore.reserve_ids``: above
    every id reserved or written before, so ids keep increasing across restarts; the
    unused rest of a block is skipped). The first block is reserved when the engine is
    set up (not on a request); the next one is reserved by the writer when half of the
    current one is used. Should the writer be too far behind and the block run out, ids
    continue past it in memory (counted in ``ids_unreserved``) and the next reservation
    starts above them: an edit is never refused for want of an id.

    Args:
        store: reserves the first block (a synchronous write at start-up).
        writer: reserves the following ones.
        block: ids per reservation.
    """

    def __init__(self, store: Any, writer: Any, block: int = 1000) -> None:
        if block < 2:
            raise ValidationError(f"the id block must be >= 2, got {block}")
        self.block = block
        self.writer = writer
        self._lock = threading.Lock()
        first = store.reserve_ids(block)
        self._next, self._end = first.start, first.stop  # [next, end) reserved, unused
        self._queued: range | None = None  # the next block, once the writer reserved it
        self._asking = False
        self.unreserved = 0

    def take(self, n: int) -> list[int]:
        """``n`` increasing ids."""
        with self._lock:
            out = []
            for _ in range(n):
                if self._next >= self._end and self._queued is not None:
                    self._next = max(self._next, self._queued.start)
                    self._end, self._queued = self._queued.stop, None
                if self._next >= self._end:
                    self.unreserved += 1
                out.append(self._next)
                self._next += 1
            low = self._end - self._next < self.block // 2
            ask = low and self._queued is None and not self._asking
            if ask:
                self._asking = True
            above = max(self._next, self._end) - 1
        if ask:
            from codebook.store.writer import WriteOp

            self.writer.submit(
                WriteOp("id block", run=lambda store: store.reserve_ids(self.block, above=above),
                        done=self._reserved, lost=self._not_reserved)
            )  # fmt: skip
        return out

    def _reserved(self, ids: range) -> None:
        with self._lock:
            self._queued, self._asking = ids, False

    def _not_reserved(self, why: str) -> None:
        with self._lock:
            self._asking = False  # ask again at the next take

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"ids_left": max(0, self._end - self._next), "ids_unreserved": self.unreserved}


# ---- the composed engine -------------------------------------------------------------------------
class ComposedEngine:
    """LM (or recent-item tokens) + adaptor + prototype bank + store (see the module doc).

    Args:
        item_ids: [I] catalogue ids in index order.
        ids: the ``codebook.semantic_ids.SemanticIdMap`` (``codes`` int64 [I, L+1] and
            ``to_tokens(item)``, the token string in the edit log).
        adaptor: a ``codebook.adaptor.Adaptor`` (eval mode).
        tokens: :class:`RecentTokens` or :class:`LMTokens`.
        bank: a ``codebook.prototypes.PrototypeBank`` (None = absolute edits).
        store: the ``PrototypeStore`` for the edit log and prototype reads (None = no log).
        model_version: ranker fingerprint the adaptor was trained against (None: any).
        uplink_items: the tokens read each request's last ``uplink_items`` items, as in
            training (the artefact's ``windows.uplink_items``; None: the whole request).
        default_dtype: payload precision when a request leaves it unspecified.
        refiner: refines the edits of requests that carry states (:class:`EditRefiner`;
            None = such requests get the usual edit, their states unused).
    """

    def __init__(
        self,
        *,
        item_ids: Sequence[str],
        ids: Any,
        adaptor: torch.nn.Module,
        tokens: TokenSource,
        bank: Any | None = None,
        store: Any | None = None,
        model_version: str | None = None,
        info: Mapping[str, Any] | None = None,
        uplink_items: int | None = None,
        refiner: EditRefiner | None = None,
    ) -> None:
        self.item_ids = [str(i) for i in item_ids]
        self.codes = np.asarray(ids.codes, dtype=np.int64)
        if len(self.codes) != len(self.item_ids):
            raise ValidationError(
                f"{len(self.codes)} semantic IDs for {len(self.item_ids)} catalogue items"
            )
        self.token_strings = ids.to_tokens
        self.adaptor = adaptor.eval()
        self.tokens = tokens
        self.uplink_items = uplink_items
        self.bank = bank
        self.store = store
        self.model_version = model_version
        self.summary_dim = int(adaptor.cfg.summary_dim)
        self.max_top_n = int(adaptor.cfg.max_items)
        self.refiner = refiner
        self.state_dim = refiner.state_dim if refiner is not None else 0
        self._info = dict(info or {})
        self._lock = threading.Lock()  # generate_edits is serialised (bank state)
        self._edit_counter = 0
        self.writer: Any | None = None  # StoreWriter: write-behind (None: write in the batch)
        self._ids: EditIds | None = None
        self.calls = 0
        self.requests = 0

    # ---- write-behind ------------------------------------------------------------------------
    def attach_writer(self, writer: Any, id_block: int = 1000) -> None:
        """Queue the store writes to ``writer`` (a ``StoreWriter``) from now on; edit ids
        come from blocks of ``id_block`` reserved in the store (the first one now)."""
        if self.store is None:
            raise ValidationError("write-behind needs a store")
        self.writer = writer
        self._ids = EditIds(self.store, writer, id_block)
        if self.bank is not None:
            self.bank.attach_writer(writer)

    # ---- edits ------------------------------------------------------------------------------
    def generate_edits(self, requests: Sequence[EditRequest]) -> list[EditResult | Exception]:
        """B requests -> B results in one LM call and one adaptor pass."""
        if not requests:
            return []
        t0 = time.perf_counter()
        with self._lock, torch.no_grad():
            if self.bank is not None and self.writer is not None:
                self.bank.apply_written()  # refinements / spawns the writer committed
            # the token source reads the window the adaptor was trained on, whatever the
            # device sent (recsys.adaptor_inputs.uplink_window)
            windows = [
                r.history
                if self.uplink_items is None
                else uplink_window(r.history, self.uplink_items)
                for r in requests
            ]
            with span("cloud.tokens", source=self.tokens.name, batch=len(requests)):
                items, scores = self.tokens(windows)  # [B, N], [B, N] | None
            for b, r in enumerate(requests):
                if r.top_n is not None:
                    items[b, r.top_n :] = -1
            codes = item_codes(items, self.codes)  # [B, N, L+1]
            summary = None
            if self.summary_dim:
                summary = torch.from_numpy(np.stack([r.summary for r in requests]))  # [B, S]
            with span("cloud.adaptor", batch=len(requests)):
                out = self.adaptor(
                    torch.from_numpy(codes),
                    None if scores is None else torch.from_numpy(scores),
                    summary,
                )
            refined: dict[int, dict[str, torch.Tensor]] = {}
            rows = [b for b, r in enumerate(requests) if r.states is not None]
            if self.refiner is not None and rows:
                with span("cloud.refine", rows=len(rows)):
                    refined = self.refiner.refine(out.tensors, [requests[b] for b in rows], rows)
            results: list[dict[str, Any] | Exception] = []
            with span("cloud.prototypes_payloads", batch=len(requests)):
                for b, r in enumerate(requests):
                    try:
                        edit = refined.get(b)
                        if edit is None:
                            edit = {k: v[b] for k, v in out.tensors.items()}
                        results.append(self._one(r, out.code[b], edit, items[b], b in refined))
                    except Exception as exc:  # one bad item must not fail the batch
                        logger.exception("edit for device %r failed", r.device_id)
                        results.append(exc)
            engine_ms = (time.perf_counter() - t0) * 1000
            with span("cloud.edit_log", behind=self.writer is not None):
                ids = self._log([x for x in results if not isinstance(x, Exception)], engine_ms)
        self.calls += 1
        self.requests += len(requests)
        final: list[EditResult | Exception] = []
        it = iter(ids)
        for x in results:
            if isinstance(x, Exception):
                final.append(x)
            else:
                final.append(
                    EditResult(
                        payload=x["payload"],
                        edit_id=next(it),
                        prototype=x["prototype"],
                        prototype_payload=x["prototype_payload"],
                        generated_items=x["items"],
                        tokens=x["tokens"],
                        edit_norm=x["norm"],
                        batch_size=len(requests),
                        engine_ms=engine_ms,
                        refined=x["refined"],
                    )
                )
        return final

    def _one(
        self,
        r: EditRequest,
        code: torch.Tensor,
        user_edit: dict[str, torch.Tensor],
        items: np.ndarray,
        refined: bool = False,
    ) -> dict[str, Any]:
        """Prototype, residual, payloads for one request (inside the batch); a refined
        edit goes whole (no prototype, the bank neither assigns nor observes it)."""
        gen = [int(i) for i in items if i >= 0]
        prototype = proto_payload = None
        if self.bank is not None and not refined:
            code_np = code.numpy().astype(np.float32)
            pid = self.bank.assign(code_np)
            version, proto_edit = self.bank.edit(pid)
            residual, norm = self.bank.residual(user_edit, pid)
            self.bank.observe(r.device_id, code_np, norm, pid)
            prototype = (int(pid), int(version))
            payload = encode_payload(residual, dtype=r.payload_dtype, prototype=prototype)
            if r.cached_prototype != prototype:
                proto_payload = encode_payload(proto_edit, dtype=r.payload_dtype)
        else:
            norm = math.sqrt(sum(float((t.float() ** 2).sum()) for t in user_edit.values()))
            payload = encode_payload(user_edit, dtype=r.payload_dtype)
        return {
            "payload": payload,
            "prototype": prototype,
            "prototype_payload": proto_payload,
            "items": gen,
            "tokens": " ".join(self.token_strings(i) for i in gen),
            "norm": float(norm),
            "device_id": r.device_id,
            "refined": refined,
        }

    def _log(self, made: list[dict[str, Any]], latency_ms: float) -> list[int]:
        """Append the batch's edits to the edit log in ONE transaction; their ids."""
        if not made:
            return []
        if self.store is None:
            first = self._edit_counter + 1
            self._edit_counter += len(made)
            return list(range(first, first + len(made)))
        from codebook.store.repository import EDIT_LOG_IDS, EditLogRepository, IdBlockRepository

        if self.writer is not None and self._ids is not None:
            return self._log_behind(made, latency_ms)
        ids = []
        with self.store.transaction(write=True) as session:
            repo = EditLogRepository(session)
            first, _ = IdBlockRepository(session).reserve(EDIT_LOG_IDS, len(made))
            rows = [repo.add(**_log_row(first + k, m, latency_ms)) for k, m in enumerate(made)]
            session.flush()
            ids = [int(row.id) for row in rows]
        return ids

    def _log_behind(self, made: list[dict[str, Any]], latency_ms: float) -> list[int]:
        """Reserved ids for the batch's edits; their rows queued as one writer op."""
        from codebook.store.repository import EditLogRepository

        assert self._ids is not None and self.writer is not None
        ids = self._ids.take(len(made))
        rows = [_log_row(i, m, latency_ms) for i, m in zip(ids, made, strict=True)]

        def write(session: Any) -> None:
            repo = EditLogRepository(session)
            for row in rows:
                repo.add(**row)

        from codebook.store.writer import WriteOp

        self.writer.submit(WriteOp("edit log", apply=write, rows=len(rows)))
        return ids

    # ---- prototypes ---------------------------------------------------------------------------
    def get_prototype(
        self, prototype_id: int, version: int | None = None, dtype: str = "fp16"
    ) -> PrototypeView:
        if self.store is None:
            raise NotFoundError("this engine keeps no prototypes")
        state = self.store.get_prototype(prototype_id, version)
        payload = encode_payload(
            {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.tensors.items()},
            dtype=dtype,
        )
        return PrototypeView(
            prototype_id=state.prototype_id,
            version=state.version,
            name=state.name,
            member_count=state.member_count,
            created_at=state.created_at,
            payload=payload,
        )

    def list_prototypes(self) -> list[PrototypeView]:
        if self.store is None:
            return []
        return [
            PrototypeView(p.id, p.current_version, p.name, 0, p.created_at)
            for p in self.store.list_prototypes()
        ]

    def info(self) -> dict[str, Any]:
        return {
            "engine": "composed",
            "tokens": self.tokens.name,
            "prototypes": len(self.bank.live) if self.bank is not None else 0,
            "summary_dim": self.summary_dim,
            "top_n": self.max_top_n,
            "items": len(self.item_ids),
            "model_version": self.model_version,
            "refine": None if self.refiner is None else self.refiner.describe(),
            "calls": self.calls,
            "requests": self.requests,
            "store_writer": None if self.writer is None else self.writer_stats(),
            **self._info,
        }

    def writer_stats(self) -> dict[str, Any]:
        """The write-behind writer's queue depth and counters, and the edit ids'."""
        if self.writer is None:
            return {}
        out = dict(self.writer.stats())
        if self._ids is not None:
            out.update(self._ids.stats())
        return out

    def close(self) -> None:
        self.tokens.close()
        if self.store is not None:
            self.store.close()


def _log_row(edit_id: int, made: dict[str, Any], latency_ms: float) -> dict[str, Any]:
    """The edit-log row of one answered edit (``made``: the batch's record of it)."""
    proto = made["prototype"]
    return dict(
        id=edit_id,
        device_id=made["device_id"],
        tokens=made["tokens"][:2000],
        prototype_id=proto[0] if proto else None,
        prototype_version=proto[1] if proto else None,
        edit_norm=made["norm"],
        payload_bytes=len(made["payload"]),
        latency_ms=latency_ms,
    )
