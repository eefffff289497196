"""The editable MLP head: user state [B, D] -> query [B, D].

Scores are ``query @ item_embeddings^T (+ item bias)`` (see :mod:`device_ranker.model`),
so the head runs once per request, not once per candidate, and an edit of the head
changes the query only. The head is deliberately tiny (two linear layers, ~16k weights
at D=64, H=128): this is what the cloud adaptor generates edits for.

The forward pass takes the layer weights as an optional argument, so the same code
scores with the base weights (the module's parameters) or with *effective* weights
``base + edit`` that live in separate tensors (:mod:`device_ranker.edits`); the base
parameters are never overwritten.

An edit's weights are normally kept **factored** (:class:`EditedLinear`, collected in
:class:`EditedWeights`): a layer computes ``x W^T + b' + (x V) A^T`` with ``A = U diag(s)``
[out, r] and ``V`` [in, r], i.e. ``2 r (in + out)`` extra FLOPs per row instead of the
``2 r in out`` of materialising ``W + A V^T`` once. Which is cheaper depends on how many
rows an edit scores, so the choice is made per case:

* per-user batches (:func:`queries_per_user`: the replay, ``Ranker.scores_per_user_edits``)
  stay factored: each edit scores one row per call (FLOPs: ``2 r (in + out)`` <
  ``2 r in out`` for every r below ``in out / (in + out)``), and the wall time is no
  worse either: 256 rows with their own rank-16 edits 5.6 ms factored vs 8.1 ms with
  stacked dense weights;
* one edit over many rows (``Ranker.scores``, :meth:`EditedWeights.forward`), and a
  user's edit across that user's requests in the device service (``rank_batch``,
  ``mode="auto"``), runs factored until the rows it scored would have paid for
  materialising (ski rental on FLOPs: ``in out / (in + out)`` rows, ~43 at D=64,
  H=128, any rank), then once materialised; a batch that big materialises at once
  (256 rows: 0.25 ms factored vs 0.16 ms dense, + 23 us to materialise rank 16).

Figures: ``recsys bench ranker`` (:mod:`device_ranker.edit_bench`) on the shared 2-core
machine under load; at B=1 the factored head costs ~48 us vs ~29 us dense (dispatch
overhead, not FLOPs, at these sizes).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from recsys.errors import ValidationError

logger = logging.getLogger(__name__)

# (weight [out, in], bias [out]) per layer, in order
HeadWeights = Sequence[tuple[torch.Tensor, torch.Tensor]]


class EditedLinear:
    """One head layer with an edit, factored: ``y = x w^T + b + (x v) a^T``.

    Attributes:
        w: [out, in] base weight (or base + an edit's dense part).
        b: [out] bias with the edit's bias delta added.
        a: [out, r] ``U diag(s)`` of the low-rank part, or None (no low-rank part).
        v: [in, r] ``V`` of the low-rank part, or None.

    Example::

        layer = EditedLinear(w, b, a=u * s, v=v)
        layer(x)                     # [B, out] == F.linear(x, w + a @ v.T, b)
    """

    __slots__ = ("a", "b", "v", "w")

    def __init__(
        self,
        w: torch.Tensor,
        b: torch.Tensor,
        a: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
    ) -> None:
        self.w, self.b, self.a, self.v = w, b, a, v

    @property
    def rank(self) -> int:
        """r of the low-rank part (0 without one)."""
        return 0 if self.a is None else int(self.a.shape[1])

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W + A V^T [out, in], b [out]): one ``mm`` + add (``2 r out in`` FLOPs)."""
        if self.a is None:
            return self.w, self.b
        return torch.addmm(self.w, self.a, self.v.t()), self.b

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in] -> [..., out] without forming ``A V^T``: ``2 r (in + out)`` extra FLOPs
        per row over the plain layer."""
        y = F.linear(x, self.w, self.b)  # [..., out]
        if self.a is None:
            return y
        return y + F.linear(F.linear(x, self.v.t()), self.a)  # (x V) A^T


# one lock for every EditedWeights' one-time materialisation (rare; a lock per edit would
# be made and freed on the device's edit path)
_MATERIALISE_LOCK = threading.Lock()


class EditedWeights(Sequence):
    """The head weights of an edit, factored per layer, dense on demand.

    As a sequence it is the plain ``HeadWeights`` (``(W + A V^T, b')`` per layer,
    materialised on first access and kept), so code that wants dense weights (the
    exported program, tests) reads it like any weight list. :func:`head_forward` and
    :func:`queries_per_user` instead call :meth:`forward` / read :attr:`layers` and
    keep it factored while that is cheaper.

    Args:
        layers: one :class:`EditedLinear` per head layer, in forward order.
    """

    def __init__(self, layers: Sequence[EditedLinear]) -> None:
        self.layers = tuple(layers)
        self._dense: tuple[tuple[torch.Tensor, torch.Tensor], ...] | None = None
        self._rows = 0  # rows scored in factored form so far

    def flops(self) -> tuple[int, int]:
        """(FLOPs of materialising every low-rank layer, ``sum 2 r out in``; extra FLOPs
        of one row in factored form, ``sum 2 r (out + in)``)."""
        dims = [(lay.rank, *lay.w.shape) for lay in self.layers if lay.a is not None]
        return sum(2 * r * o * i for r, o, i in dims), sum(2 * r * (o + i) for r, o, i in dims)

    @property
    def materialised(self) -> bool:
        """True once the dense weights exist (then every forward uses them)."""
        return self._dense is not None or all(lay.a is None for lay in self.layers)

    def dense(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """(W + A V^T, b') per layer, computed once."""
        if self._dense is None:
            with _MATERIALISE_LOCK, torch.no_grad():
                if self._dense is None:
                    self._dense = tuple(lay.dense() for lay in self.layers)
        return self._dense

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i):  # type: ignore[override]
        return self.dense()[i]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.dense())

    def forward(
        self, x: torch.Tensor, residual: bool, mode: Literal["auto", "factored", "dense"] = "auto"
    ) -> torch.Tensor:
        """[..., D] -> [..., D] queries, factored or dense, whichever is cheaper
        (``mode="auto"``; "factored" / "dense" force one, e.g. to measure both).

        Ski rental on FLOPs (:meth:`flops`): rows run factored until the rows scored so
        far would have paid for materialising (~43 rows at D=64, H=128, any rank); then
        the dense weights are built once and used from then on (a batch that alone
        reaches the break-even materialises at once). Never worse than twice the cheaper
        of the two in hindsight.

        Example::

            q = prepared.weights.forward(states, head.residual)   # [B, D]
        """
        rows = x.numel() // max(x.shape[-1], 1)
        if mode == "dense" or (mode == "auto" and self.charge(rows)):
            return head_forward(x, self.dense(), residual)
        h = x
        last = len(self.layers) - 1
        for i, lay in enumerate(self.layers):
            h = lay(h)  # [..., out_i]
            if i < last:
                h = F.gelu(h)
        return x + h if residual else h

    def charge(self, rows: int) -> bool:
        """Count ``rows`` more rows scored with this edit; True when they should use the
        dense weights (materialised already, or the rows so far have paid for it)."""
        if self.materialised:
            return True
        self._rows += rows
        dense_flops, row_flops = self.flops()
        return self._rows * row_flops >= dense_flops


def head_forward(x: torch.Tensor, weights: HeadWeights, residual: bool) -> torch.Tensor:
    """Functional head: GELU between layers, optional residual ``x + mlp(x)``.

    Args:
        x: [..., D] user states.
        weights: per layer (W [out, in], b [out]); first in = last out = D; or an
            :class:`EditedWeights` (factored or dense, see :meth:`EditedWeights.forward`).
        residual: add the input to the output.

    Returns:
        [..., D] query vectors.
    """
    if isinstance(weights, EditedWeights):
        return weights.forward(x, residual)
    h = x
    last = len(weights) - 1
    for i, (w, b) in enumerate(weights):
        h = F.linear(h, w, b)  # [..., out_i]
        if i < last:
            h = F.gelu(h)
    return x + h if residual else h


class EditableHead(nn.Module):
    """MLP head whose layers are the target of parameter edits.

    Args:
        dims: layer widths (D, H, ..., D); first and last must be equal (query width D).
        residual: query = state + MLP(state).

    Shapes: input [..., D] -> output [..., D].

    Example::

        head = EditableHead((64, 128, 64))
        head.edit_spec()          # {'fc0': (128, 64), 'fc1': (64, 128)}
        head(torch.randn(3, 64)).shape   # torch.Size([3, 64])
    """

    def __init__(self, dims: Sequence[int], residual: bool = True) -> None:
        super().__init__()
        dims = tuple(int(d) for d in dims)
        if len(dims) < 2 or dims[0] != dims[-1]:
            raise ValidationError(
                f"head dims must start and end with the query width D, got {dims}"
            )
        self.dims = dims
        self.residual = residual
        self.layers = nn.ModuleDict(
            {f"fc{i}": nn.Linear(dims[i], dims[i + 1]) for i in range(len(dims) - 1)}
        )
        if residual:  # start close to the identity map: the encoder state is already a query
            last = self.layers[f"fc{len(dims) - 2}"]
            nn.init.normal_(last.weight, std=0.01)
            nn.init.zeros_(last.bias)
        self._spec = {n: (m.out_features, m.in_features) for n, m in self.layers.items()}
        # (name, W, b) cached for the edit fast path: parameters are only ever updated in
        # place (optimiser steps, load_state_dict), never replaced
        self._named_params = tuple((n, m.weight, m.bias) for n, m in self.layers.items())

    def layer_names(self) -> tuple[str, ...]:
        """Layer names in forward order (``fc0``, ``fc1``, ...): the keys of an edit."""
        return tuple(self.layers.keys())

    def edit_spec(self) -> dict[str, tuple[int, int]]:
        """Layer name -> (out, in) weight shape: what an edit generator must produce."""
        return dict(self._spec)

    def base_weights(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """The module's own (W, b) per layer (the base; never modified by edits)."""
        return tuple((m.weight, m.bias) for m in self.layers.values())

    def forward(self, x: torch.Tensor, weights: HeadWeights | None = None) -> torch.Tensor:
        """[..., D] -> [..., D], with the base weights or the given effective weights."""
        return head_forward(x, self.base_weights() if weights is None else weights, self.residual)


def head_forward_per_user(
    x: torch.Tensor, weights: Sequence[tuple[torch.Tensor, torch.Tensor]], residual: bool
) -> torch.Tensor:
    """Head with a different dense weight set per user.

    Args:
        x: [B, D] user states.
        weights: per layer (W [B, out, in], b [B, out]).

    Returns:
        [B, D] queries; row b equals ``head_forward(x[b], weights_b)`` up to rounding.
    """
    h = x.unsqueeze(-1)  # [B, D, 1]
    last = len(weights) - 1
    for i, (w, b) in enumerate(weights):
        h = torch.baddbmm(b.unsqueeze(-1), w, h)  # [B, out, 1]
        if i < last:
            h = F.gelu(h)
    h = h.squeeze(-1)
    return x + h if residual else h


def _per_row_layer(h: torch.Tensor, rows: Sequence[EditedLinear], base_w: torch.Tensor):
    """One layer with its own :class:`EditedLinear` per row: h [B, in] -> [B, out].

    The dense part is one shared ``addmm`` when every row keeps the base W (cloud edits),
    else a ``bmm`` over the stacked per-row W [B, out, in] (e.g. fine-tuned heads); the
    low-rank parts are zero-padded to the largest rank R and applied as
    ``(h V_b) A_b^T`` with two ``bmm`` ([B, R, in], [B, R, out]): ``2 R (in + out)``
    FLOPs per row, never the [B, out, in] stack of materialised weights.
    """
    bias = torch.stack([r.b for r in rows])  # [B, out]
    if all(r.w is base_w for r in rows):
        y = torch.addmm(bias, h, base_w.t())  # [B, out]
    else:
        w = torch.stack([r.w for r in rows])  # [B, out, in]
        y = torch.baddbmm(bias.unsqueeze(-1), w, h.unsqueeze(-1)).squeeze(-1)
    ranks = {r.rank for r in rows}
    if ranks == {0}:
        return y
    if len(ranks) == 1:  # one rank, every row edited: a plain stack
        at = torch.stack([r.a.t() for r in rows])  # [B, R, out]
        vt = torch.stack([r.v.t() for r in rows])  # [B, R, in]
    else:
        out_f, in_f = base_w.shape
        none_a, none_v = h.new_zeros(0, out_f), h.new_zeros(0, in_f)
        at = pad_sequence([none_a if r.a is None else r.a.t() for r in rows], batch_first=True)
        vt = pad_sequence([none_v if r.v is None else r.v.t() for r in rows], batch_first=True)
    t = torch.bmm(vt, h.unsqueeze(-1))  # [B, R, 1] = (h V)^T
    return torch.baddbmm(y.unsqueeze(-1), at.transpose(1, 2), t).squeeze(-1)  # [B, out]


def queries_per_user(
    head: EditableHead,
    x: torch.Tensor,
    weights: Sequence[EditedWeights | HeadWeights | None],
    mode: Literal["factored", "auto"] = "factored",
) -> torch.Tensor:
    """The one batched head pass with a weight set per row (the device service's
    micro-batches, the replay's events): row b uses ``weights[b]`` (None = the base head).

    A batch whose rows all share one weight set (B=1, or no edits) runs the plain head
    (factored for an :class:`EditedWeights`). Otherwise the edits stay factored
    (:func:`_per_row_layer`): each row is scored once per call, so ``2 r (in + out)``
    FLOPs per row always beat materialising ``2 r in out`` (the replay counts exactly
    this, ``recsys.replay.costs.event_flops``). ``mode="auto"`` (the device service,
    where a user's edit serves all their requests until the next one) charges each row to
    its edit's ski rental (:meth:`EditedWeights.charge`) and scores an edit that has paid
    for materialising with its dense weights; stateful, so the replay, whose policies
    share edit objects, keeps the default.
    :class:`EditedWeights` rows use their factors even if already materialised; plain
    (W, b) lists are dense rows.

    Args:
        head: the ranker's :class:`EditableHead` (base weights, residual flag).
        x: [B, D] user states.
        weights: B entries, each None, an :class:`EditedWeights` (e.g.
            ``PreparedEdit.weights``) or per layer (W [out, in], b [out]).

    Returns:
        [B, D] queries.

    Example::

        q = queries_per_user(model.head, states, [None, prepared.weights])  # [2, D]
    """
    if len(weights) != x.shape[0]:
        raise ValidationError(f"{len(weights)} weight sets for {x.shape[0]} rows")
    first = weights[0] if weights else None
    if all(w is first for w in weights):  # one weight set (e.g. B=1): the plain head
        if first is None:
            return head(x)
        if isinstance(first, EditedWeights):
            return first.forward(x, head.residual, mode=mode)
        return head_forward(x, first, head.residual)
    base = head.base_weights()
    plain = tuple(EditedLinear(w, b) for w, b in base)

    def row(w) -> tuple[EditedLinear, ...]:
        if w is None:
            return plain
        if isinstance(w, EditedWeights):
            if mode == "auto" and w.charge(1):
                return tuple(EditedLinear(wi, bi) for wi, bi in w.dense())
            return w.layers
        return tuple(EditedLinear(wi, bi) for wi, bi in w)

    rows = [row(w) for w in weights]
    h = x
    last = len(base) - 1
    for i, (w0, _) in enumerate(base):
        h = _per_row_layer(h, [r[i] for r in rows], w0)  # [B, out_i]
        if i < last:
            h = F.gelu(h)
    return x + h if head.residual else h
