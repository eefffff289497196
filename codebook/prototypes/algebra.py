"""Edit algebra of prototypes (cloud side, plain tensors): dense deltas, hard clipping,
the device's bounded low-rank residual against its prototype, and prototype edits
decoded from codes.

A device's head is ``base + P + R`` with ``P = clip(decode(c_p), (1 - rho) * bound)``
(:func:`prototype_edits`) and ``R = clip(rank-R_res SVD of (E_u - P), rho * bound)``
(:func:`residual_edit`), so ``||P + R||_F <= bound`` per layer (triangle inequality).

Flat edits are unbatched: ``"fc0.u"`` [out, R], ``"fc0.s"`` [R], ``"fc0.v"`` [in, R],
``"fc0.bias"`` [out], optionally ``"fc0.dense"`` [out, in].

Example::

    residual, norm = residual_edit(user_edit, proto_edit, spec, rank=4, bound=1.0,
                                   bias_bound=0.05)
    dense_delta(residual, "fc0").shape        # [out, in], ||.||_F <= 1.0
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping

import numpy as np
import torch

from codebook.adaptor import HeadSpec, lowrank_norm
from codebook.prototypes.config import PrototypeConfig

logger = logging.getLogger(__name__)

DecodeFn = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]  # codes [P, C] -> batched flat


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
