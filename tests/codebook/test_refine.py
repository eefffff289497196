"""codebook.refine: cloud-side refinement of generated low-rank edits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codebook.refine import HeadTensors, RefineConfig, lowrank_queries, refine_edits
from device_ranker.head import head_forward
from recsys.errors import ValidationError

D, H, ITEMS, R, B, P = 8, 16, 30, 2, 3, 6


def world(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    layers = [
        ("fc0", torch.randn(H, D, generator=g) * 0.3, torch.randn(H, generator=g) * 0.1),
        ("fc1", torch.randn(D, H, generator=g) * 0.3, torch.randn(D, generator=g) * 0.1),
    ]
    head = HeadTensors.from_weights(
        layers,
        residual=True,
        item_table=torch.randn(ITEMS, D, generator=g),
        item_bias=torch.zeros(ITEMS),
    )
    tensors = {}
    for name, w, _ in layers:
        o, n = w.shape
        tensors[f"{name}.u"] = torch.linalg.qr(torch.randn(B, o, R, generator=g))[0]
        tensors[f"{name}.s"] = torch.rand(B, R, generator=g) * 0.2
        tensors[f"{name}.v"] = torch.linalg.qr(torch.randn(B, n, R, generator=g))[0]
        tensors[f"{name}.bias"] = torch.zeros(B, o)
    states = torch.randn(B, P, D, generator=g)
    targets = torch.randint(0, ITEMS, (B, P), generator=g)
    targets[2, 3:] = -1  # a user with fewer positions
    return head, tensors, states, targets


def loss(head, tensors, states, targets) -> torch.Tensor:
    """[B] per-user mean next-item CE (the refinement's objective)."""
    logits = head.logits(lowrank_queries(head.layers, head.residual, states, tensors))
    ce = F.cross_entropy(logits.flatten(0, 1), targets.clamp_min(0).flatten(), reduction="none")
    valid = targets >= 0
    return (ce.view_as(targets) * valid).sum(1) / valid.sum(1)


def test_lowrank_queries_equal_the_device_head_with_the_edit_applied() -> None:
    head, tensors, states, _ = world()
    q = lowrank_queries(head.layers, head.residual, states, tensors)  # [B, P, D]
    for b in range(B):
        weights = [
            (w + (tensors[f"{n}.u"][b] * tensors[f"{n}.s"][b]) @ tensors[f"{n}.v"][b].T, bias)
            for n, w, bias in head.layers
        ]
        torch.testing.assert_close(q[b], head_forward(states[b], weights, True), atol=1e-5, rtol=0)


def test_refinement_lowers_the_objective_and_stays_a_bounded_orthonormal_edit() -> None:
    head, tensors, states, targets = world()
    bound, bias_bound = 0.5, 0.05
    out = refine_edits(
        head, tensors, states, targets, RefineConfig(steps=20, lr=1e-2), bound=bound,
        bias_bound=bias_bound,
    )  # fmt: skip
    assert (loss(head, out, states, targets) < loss(head, tensors, states, targets)).all()
    for n, _, _ in head.layers:
        u, s, v = out[f"{n}.u"], out[f"{n}.s"], out[f"{n}.v"]
        assert u.shape == tensors[f"{n}.u"].shape and v.shape == tensors[f"{n}.v"].shape
        eye = torch.eye(R).expand(B, R, R)
        torch.testing.assert_close(u.transpose(1, 2) @ u, eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(v.transpose(1, 2) @ v, eye, atol=1e-5, rtol=0)
        dw = (u * s.unsqueeze(1)) @ v.transpose(1, 2)  # [B, O, N]
        assert (dw.flatten(1).norm(dim=1) <= bound + 1e-5).all()
        assert out[f"{n}.bias"].abs().max() <= bias_bound + 1e-7


def test_users_are_refined_independently_of_their_batch() -> None:
    head, tensors, states, targets = world()
    cfg = RefineConfig(steps=5, lr=3e-3)
    together = refine_edits(head, tensors, states, targets, cfg, bound=9.0, bias_bound=9.0)
    for b in range(B):
        one = {k: t[b : b + 1] for k, t in tensors.items()}
        alone = refine_edits(
            head, one, states[b : b + 1], targets[b : b + 1], cfg, bound=9.0, bias_bound=9.0
        )
        for n, _, _ in head.layers:

            def dw(e, i, n=n):
                return (e[f"{n}.u"][i] * e[f"{n}.s"][i]) @ e[f"{n}.v"][i].T

            torch.testing.assert_close(dw(together, b), dw(alone, 0), atol=1e-5, rtol=0)


def test_zero_steps_keeps_the_edit_and_bad_shapes_are_refused() -> None:
    head, tensors, states, targets = world()
    same = refine_edits(
        head, tensors, states, targets, RefineConfig(steps=0), bound=1, bias_bound=1
    )
    assert all(torch.equal(same[k], tensors[k]) for k in tensors)
    with pytest.raises(ValidationError, match=r"states must be \[B, P, D\]"):
        refine_edits(head, tensors, states[0], targets, RefineConfig(), bound=1, bias_bound=1)
    with pytest.raises(ValidationError, match="steps"):
        RefineConfig(steps=-1)
