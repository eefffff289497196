"""The editable MLP head: user state [B, D] -> query [B, D].

Scores are ``query @ item_embeddings^T (+ item bias)`` (see :mod:`device_ranker.model`),
so the head runs once per request, not once per candidate, and an edit of the head
changes the query only. The head is deliberately tiny (two linear layers, ~16k weights
at D=64, H=128): this is what the cloud adaptor generates edits for.

The forward pass takes the layer weights as an optional argument, so the same code
scores with the base weights (the module's parameters) or with *effective* weights
``base + edit`` that live in separate tensors (:mod:`device_ranker.edits`); the base
parameters are never overwritten.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from recsys.errors import ValidationError

logger = logging.getLogger(__name__)

# (weight [out, in], bias [out]) per layer, in order
HeadWeights = Sequence[tuple[torch.Tensor, torch.Tensor]]


def head_forward(x: torch.Tensor, weights: HeadWeights, residual: bool) -> torch.Tensor:
    """Functional head: GELU between layers, optional residual ``x + mlp(x)``.

    Args:
        x: [..., D] user states.
        weights: per layer (W [out, in], b [out]); first in = last out = D.
        residual: add the input to the output.

    Returns:
        [..., D] query vectors.
    """
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
    """Head with a different weight set per user (e.g. one edit per device in a replay).

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


def queries_per_user(
    head: EditableHead, x: torch.Tensor, weights: Sequence[HeadWeights | None]
) -> torch.Tensor:
    """The one batched head pass with a weight set per row (the device service's
    micro-batches, the replay's events): row b uses ``weights[b]`` (None = the base head).

    Rows without an edit in a batch that has none run the plain head; otherwise every
    row's (W, b) is stacked per layer ([B, out, in], [B, out]) and
    :func:`head_forward_per_user` runs once.

    Args:
        head: the ranker's :class:`EditableHead` (base weights, residual flag).
        x: [B, D] user states.
        weights: B entries, each None or per layer (W [out, in], b [out]) (e.g.
            ``PreparedEdit.weights``).

    Returns:
        [B, D] queries.

    Example::

        q = queries_per_user(model.head, states, [None, prepared.weights])  # [2, D]
    """
    if len(weights) != x.shape[0]:
        raise ValidationError(f"{len(weights)} weight sets for {x.shape[0]} rows")
    if all(w is None for w in weights):
        return head(x)
    base = head.base_weights()
    full = [base if w is None else w for w in weights]
    stacked = [
        (torch.stack([w[i][0] for w in full]), torch.stack([w[i][1] for w in full]))
        for i in range(len(base))
    ]  # per layer: W [B, out, in], b [B, out]
    return head_forward_per_user(x, stacked, head.residual)
