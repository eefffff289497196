"""The joint fast path of ``prepare_decoded`` (every fast layer with one set of numpy
calls): the same weights as the per-layer path and ``prepare_edit``, the same refusals,
its fallbacks, and edits that stay intact while later ones are prepared."""

from __future__ import annotations

import pytest
import torch

from device_ranker.edit_apply import _plan, prepare_decoded, prepare_edit
from device_ranker.edits import EditBounds, HeadEdit, LayerEdit, random_edit
from device_ranker.head import EditableHead
from device_ranker.ranker import Ranker
from recsys.edit_payload import decode_values, encode_payload
from recsys.errors import ValidationError


def _decoded(edit: HeadEdit, dtype: str = "fp32", **kw):
    return decode_values(encode_payload(edit.to_flat(), dtype=dtype), **kw)


def _same(fast, slow) -> None:
    for a, b in zip(fast.weights, slow.weights, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("rank", [1, 3])
def test_joint_path_builds_what_prepare_edit_builds(dtype: str, rank: int) -> None:
    head = EditableHead((8, 16, 8))
    edit = random_edit(head, rank=rank, scale=0.01, generator=torch.Generator().manual_seed(rank))
    decoded = _decoded(edit, dtype)
    assert _plan(head, decoded, EditBounds()).joint is not None
    fast = prepare_decoded(head, decoded)
    assert all(lay.a is not None for lay in fast.weights.layers)  # kept factored
    _same(fast, prepare_edit(head, HeadEdit.from_flat(decoded.tensors())))


def test_joint_path_takes_layers_with_only_a_bias_or_only_factors() -> None:
    head = EditableHead((8, 16, 8))
    g = torch.Generator().manual_seed(0)
    edit = HeadEdit(
        {
            "fc0": LayerEdit(bias=torch.randn(16, generator=g) * 0.01),
            "fc1": LayerEdit(
                u=torch.randn(8, 2, generator=g) * 0.1,
                s=torch.ones(2),
                v=torch.randn(16, 2, generator=g) * 0.1,
            ),
        }
    )
    decoded = _decoded(edit)
    assert _plan(head, decoded, EditBounds()).joint is not None
    _same(prepare_decoded(head, decoded), prepare_edit(head, edit))


def test_layers_of_different_ranks_or_with_a_dense_part_take_the_per_layer_path() -> None:
    head = EditableHead((8, 16, 8))
    g = torch.Generator().manual_seed(1)

    def low_rank(out_f: int, in_f: int, r: int, **kw) -> LayerEdit:
        u, v = torch.randn(out_f, r, generator=g), torch.randn(in_f, r, generator=g)
        return LayerEdit(u=u * 0.1, s=torch.ones(r), v=v * 0.1, **kw)

    mixed = HeadEdit({"fc0": low_rank(16, 8, 1), "fc1": low_rank(8, 16, 2)})
    decoded = _decoded(mixed)
    assert _plan(head, decoded, EditBounds()).joint is None  # two ranks
    _same(prepare_decoded(head, decoded), prepare_edit(head, mixed))
    dense = HeadEdit(
        {
            "fc0": LayerEdit(dense=torch.randn(16, 8, generator=g) * 0.01, bias=torch.zeros(16)),
            "fc1": low_rank(8, 16, 2, bias=torch.full((8,), 0.1)),
        }
    )
    decoded = _decoded(dense)
    plan = _plan(head, decoded, EditBounds())
    assert plan.joint is not None and not plan.joint.whole  # fc1 joint, fc0 general
    _same(prepare_decoded(head, decoded), prepare_edit(head, dense))


def test_an_edit_over_the_summed_bound_but_within_each_layers_is_accepted() -> None:
    """The joint bound sums the layers; an edit it cannot clear goes to the per-layer
    bounds (and exact checks), which accept it with the same weights."""
    head = EditableHead((8, 16, 8))
    u0, v0 = torch.zeros(16, 1), torch.zeros(8, 1)
    u1, v1 = torch.zeros(8, 1), torch.zeros(16, 1)
    u0[0, 0] = v0[0, 0] = u1[0, 0] = v1[0, 0] = 1.0
    edit = HeadEdit(
        {
            "fc0": LayerEdit(u=u0, s=torch.tensor([0.9]), v=v0, bias=torch.full((16,), 0.1)),
            "fc1": LayerEdit(u=u1, s=torch.tensor([0.9]), v=v1, bias=torch.full((8,), 0.1)),
        }
    )
    bounds = EditBounds(max_weight_norm=1.0, max_bias_abs=0.5)  # (0.81+0.81)*(1+1) > 1 >= 0.81
    _same(prepare_decoded(head, _decoded(edit), bounds), prepare_edit(head, edit, bounds))


@pytest.mark.parametrize(
    ("bounds", "match"),
    [
        (EditBounds(max_weight_norm=1e-4), r"layer 'fc0': \|\|dW\|\|_F = .* > bound"),
        (EditBounds(max_bias_abs=1e-6), r"layer 'fc0': bias delta has max"),
    ],
)
def test_joint_path_refuses_with_the_per_layer_errors(bounds: EditBounds, match: str) -> None:
    head = EditableHead((8, 16, 8))
    edit = random_edit(head, rank=2, scale=0.01, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValidationError, match=match):
        prepare_decoded(head, _decoded(edit), bounds)
    with pytest.raises(ValidationError, match=match):
        prepare_edit(head, edit, bounds)


def test_an_applied_edit_is_not_changed_by_preparing_the_next(tiny_model) -> None:
    """Every prepared edit owns its memory: applying a second payload (same layout, so
    the same plan and staging buffers) leaves the first one's tensors as they were."""
    ranker = Ranker(tiny_model)
    head, spec = tiny_model.head, tiny_model.head.edit_spec()
    edits = [random_edit(head, 2, 0.01, generator=torch.Generator().manual_seed(s)) for s in (5, 6)]
    payloads = [encode_payload(e.to_flat(), dtype="fp16") for e in edits]

    def apply(data: bytes):
        return ranker.apply_edit(ranker.prepare_decoded(decode_values(data, spec=spec, max_rank=8)))

    first = apply(payloads[0])
    kept = [(lay.a.clone(), lay.v.clone(), lay.b.clone()) for lay in first.weights.layers]
    second = apply(payloads[1])
    for lay, (a, v, b) in zip(first.weights.layers, kept, strict=True):
        assert torch.equal(lay.a, a) and torch.equal(lay.v, v) and torch.equal(lay.b, b)
    assert not torch.equal(second.weights.layers[0].a, first.weights.layers[0].a)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_joint_path_on_a_deeper_head_with_mixed_layers(dtype: str) -> None:
    """Four layers of different widths: the stacked A / V rows of each layer, and the
    row gather of s, land where each layer's own U diag(s) and V would."""
    head = EditableHead((8, 16, 12, 24, 8))
    g = torch.Generator().manual_seed(5)
    full = random_edit(head, rank=3, scale=0.01, generator=g)
    decoded = _decoded(full, dtype)
    assert _plan(head, decoded, EditBounds()).joint.whole
    _same(prepare_decoded(head, decoded), prepare_edit(head, HeadEdit.from_flat(decoded.tensors())))
    mixed = HeadEdit(
        {
            "fc0": LayerEdit(bias=torch.randn(16, generator=g) * 0.01),
            "fc1": full.layers["fc1"],
            "fc3": full.layers["fc3"],  # fc2 untouched
        }
    )
    decoded = _decoded(mixed, dtype)
    joint = _plan(head, decoded, EditBounds()).joint
    assert joint is not None and not joint.whole
    _same(prepare_decoded(head, decoded), prepare_edit(head, HeadEdit.from_flat(decoded.tensors())))
