"""Head edits: plain-data format, validation, exact revert, no autograd."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from device_ranker.edits import EditBounds, HeadEdit, LayerEdit, prepare_edit, random_edit
from device_ranker.head import EditableHead
from device_ranker.model import SeqRanker
from device_ranker.ranker import Ranker
from recsys.errors import ValidationError

HISTORIES = [[1, 2, 3], [], [4, 5, 6, 7, 8, 9, 10]]


def small_edit(head: EditableHead, seed: int = 0, rank: int = 2) -> HeadEdit:
    return random_edit(head, rank=rank, scale=0.01, generator=torch.Generator().manual_seed(seed))


def test_edit_round_trips_as_plain_tensors(tiny_model: SeqRanker) -> None:
    edit = small_edit(tiny_model.head)
    data = edit.to_dict()
    assert data["format"] == "device_ranker.head_edit.v1"
    assert set(data["layers"]) == {"fc0", "fc1"}
    buf = io.BytesIO()
    torch.save(data, buf)
    buf.seek(0)
    loaded = HeadEdit.from_dict(torch.load(buf, weights_only=True))  # no pickled classes
    assert loaded == edit
    flat = edit.to_flat()
    assert "fc0.u" in flat and "fc1.bias" in flat
    assert HeadEdit.from_flat(flat, edit.meta) == edit
    with pytest.raises(ValidationError, match="bad flat edit key"):
        HeadEdit.from_flat({"fc0.w": torch.zeros(1)})
    assert edit.nbytes() == sum(
        t.numel() * 4 for le in edit.layers.values() for t in le.parts().values()
    )
    assert edit.to(torch.float16).nbytes() * 2 == edit.nbytes()
    with pytest.raises(ValidationError, match="format"):
        HeadEdit.from_dict({"layers": {}})


def test_edit_changes_scores_and_revert_is_bit_exact(tiny_model: SeqRanker) -> None:
    ranker = Ranker(tiny_model)
    base = ranker.scores(HISTORIES)
    ranker.apply_edit(small_edit(tiny_model.head))
    edited = ranker.scores(HISTORIES)
    assert not torch.equal(base, edited)
    ranker.revert_edit()
    assert ranker.active_edit is None
    assert torch.equal(ranker.scores(HISTORIES), base)


def test_edit_scores_equal_merged_weights(tiny_model: SeqRanker) -> None:
    edit = small_edit(tiny_model.head, rank=3)
    prepared = prepare_edit(tiny_model.head, edit)
    x = torch.randn(4, tiny_model.cfg.dim)
    merged = EditableHead(tiny_model.head.dims)
    with torch.no_grad():
        for name, layer in merged.layers.items():
            base = tiny_model.head.layers[name]
            le = edit.layers[name]
            layer.weight.copy_(base.weight + le.u @ torch.diag(le.s) @ le.v.T)
            layer.bias.copy_(base.bias + le.bias)
    torch.testing.assert_close(tiny_model.head(x, prepared.weights), merged(x))


def test_applying_does_no_autograd_and_leaves_parameters(
    tiny_model: SeqRanker, monkeypatch
) -> None:
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    edit = small_edit(tiny_model.head)
    for le in edit.layers.values():  # even factors that require grad must not build a graph
        for t in le.parts().values():
            t.requires_grad_(True)
    grad_seen: list[bool] = []
    real_addmm = torch.addmm

    def spy_addmm(*args, **kwargs):
        grad_seen.append(torch.is_grad_enabled())
        return real_addmm(*args, **kwargs)

    monkeypatch.setattr(torch, "addmm", spy_addmm)
    prepared = prepare_edit(tiny_model.head, edit)
    dense = list(prepared.weights)  # materialising W + A V^T (torch.addmm) is graph-free too
    monkeypatch.undo()
    assert grad_seen and not any(grad_seen)
    for w, b in dense:
        assert w.grad_fn is None and b.grad_fn is None
    for layer in prepared.weights.layers:  # the factors kept for the forward
        for t in (layer.w, layer.b, layer.a, layer.v):
            assert t is None or t.grad_fn is None
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, before[k]), k


def _layer(head: EditableHead, name: str = "fc0", **parts) -> HeadEdit:
    return HeadEdit({name: LayerEdit(**parts)})


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda o, i: _layer(None, "nope", bias=torch.zeros(o)), "unknown head layer"),
        (lambda o, i: _layer(None, bias=torch.zeros(o + 1)), "shape"),
        (lambda o, i: _layer(None, dense=torch.zeros(i, o)), "shape"),
        (
            lambda o, i: _layer(None, u=torch.zeros(o, 2), s=torch.ones(2), v=torch.zeros(i, 3)),
            "shape",
        ),
        (lambda o, i: _layer(None, u=torch.zeros(o, 2), s=torch.ones(2)), "u, s and v together"),
        (lambda o, i: _layer(None, bias=torch.zeros(o, dtype=torch.int64)), "dtype"),
        (lambda o, i: _layer(None, bias=torch.zeros(o, dtype=torch.float64)), "dtype"),
        (lambda o, i: _layer(None, bias=torch.full((o,), float("nan"))), "NaN or Inf"),
        (lambda o, i: _layer(None, dense=torch.full((o, i), float("inf"))), "NaN or Inf"),
        (
            lambda o, i: _layer(
                None, u=torch.ones(o, 1), s=torch.tensor([float("nan")]), v=torch.ones(i, 1)
            ),
            "NaN or Inf",
        ),
        (lambda o, i: _layer(None, bias=torch.full((o,), 0.6)), "bias delta has max"),
        (lambda o, i: _layer(None, dense=torch.full((o, i), 0.45)), "\\|\\|dW\\|\\|_F"),
        (lambda o, i: _layer(None, dense=torch.full((o, i), 1e30)), "\\|\\|dW\\|\\|_F"),
        (
            lambda o, i: _layer(
                None, u=torch.zeros(o, 1), s=torch.ones(1), v=torch.full((i, 1), float("inf"))
            ),
            "NaN or Inf",
        ),
        (lambda o, i: _layer(None, bias=[0.0] * o), "expected a tensor"),
    ],
)
def test_invalid_edits_are_rejected(tiny_model: SeqRanker, make, match: str) -> None:
    out_f, in_f = tiny_model.head.edit_spec()["fc0"]
    ranker = Ranker(tiny_model, bounds=EditBounds(max_bias_abs=0.5, max_weight_norm=2.0))
    base = ranker.scores(HISTORIES)
    with pytest.raises(ValidationError, match=match):
        ranker.apply_edit(make(out_f, in_f))
    assert ranker.active_edit is None
    assert torch.equal(ranker.scores(HISTORIES), base)


def test_rank_bound_and_fp16_edits(tiny_model: SeqRanker) -> None:
    head = tiny_model.head
    with pytest.raises(ValidationError, match="length r"):
        prepare_edit(head, small_edit(head, rank=4), EditBounds(max_rank=2))
    half = small_edit(head).to(torch.float16)
    prepared = prepare_edit(head, half)
    assert all(w.dtype == torch.float32 for w, _ in prepared.weights)


def test_compose_equals_sum_of_edits(tiny_model: SeqRanker) -> None:
    head = tiny_model.head
    a, b = small_edit(head, 1), small_edit(head, 2)
    x = torch.randn(3, tiny_model.cfg.dim)
    composed = prepare_edit(head, HeadEdit.compose(a, b)).weights
    pa, pb = prepare_edit(head, a).weights, prepare_edit(head, b).weights
    manual = [
        (wa + wb - w, ba + bb - bias)
        for (wa, ba), (wb, bb), (w, bias) in zip(pa, pb, head.base_weights(), strict=True)
    ]
    torch.testing.assert_close(head(x, composed), head(x, manual))


def test_per_user_edits_match_single_edits(tiny_model: SeqRanker) -> None:
    ranker = Ranker(tiny_model)
    e1, e2 = small_edit(tiny_model.head, 1), small_edit(tiny_model.head, 2)
    batched = ranker.scores_per_user_edits(HISTORIES, [e1, None, e2])
    torch.testing.assert_close(batched[0], ranker.scores(HISTORIES[:1], edit=e1)[0])
    torch.testing.assert_close(batched[1], ranker.scores(HISTORIES[1:2], edit="base")[0])
    torch.testing.assert_close(batched[2], ranker.scores(HISTORIES[2:], edit=e2)[0])


def test_optional_elementwise_weight_bound(tiny_model: SeqRanker) -> None:
    out_f, in_f = tiny_model.head.edit_spec()["fc0"]
    dense = torch.zeros(out_f, in_f)
    dense[0, 0] = 0.3
    edit = _layer(None, dense=dense)
    prepare_edit(tiny_model.head, edit, EditBounds())  # norm 0.3 is fine
    with pytest.raises(ValidationError, match=r"EditBounds\.max_weight_abs"):
        prepare_edit(tiny_model.head, edit, EditBounds(max_weight_abs=0.2))


@settings(max_examples=25, deadline=None)
@given(rank=st.integers(1, 4), scale=st.floats(1e-4, 0.05), seed=st.integers(0, 1000))
def test_property_accepted_edits_respect_bounds(rank: int, scale: float, seed: int) -> None:
    torch.manual_seed(0)
    head = EditableHead((8, 16, 8))
    bounds = EditBounds(max_weight_norm=0.5, max_weight_abs=0.05, max_bias_abs=0.05)
    edit = random_edit(head, rank=rank, scale=scale, generator=torch.Generator().manual_seed(seed))
    dws = [le.delta_weight() for le in edit.layers.values()]
    biases = [le.bias for le in edit.layers.values()]
    within = all(float(d.norm()) <= 0.5 and float(d.abs().max()) <= 0.05 for d in dws) and all(
        float(b.abs().max()) <= 0.05 for b in biases
    )
    try:
        prepared = prepare_edit(head, edit, bounds)
    except ValidationError:
        assert not within
        return
    assert within
    base = [(w.detach(), b.detach()) for w, b in head.base_weights()]
    for (w, b), (w0, b0), dw, db in zip(prepared.weights, base, dws, biases, strict=True):
        torch.testing.assert_close(w - w0, dw)
        torch.testing.assert_close(b - b0, db)


def test_payload_spec_is_the_edit_spec_read_only(tiny_model: SeqRanker) -> None:
    from recsys.edit_payload import decode_values, encode_payload

    ranker = Ranker(tiny_model)
    assert dict(ranker.payload_spec) == ranker.edit_spec()
    with pytest.raises(TypeError):
        ranker.payload_spec["fc0"] = (1, 1)  # type: ignore[index]
    data = encode_payload(small_edit(tiny_model.head).to_flat(), dtype="fp16")
    with_copy = decode_values(data, spec=ranker.edit_spec(), max_rank=ranker.bounds.max_rank)
    with_view = decode_values(data, spec=ranker.payload_spec, max_rank=ranker.bounds.max_rank)
    assert (with_copy.values == with_view.values).all()
    bad = {**ranker.edit_spec(), "fc0": (1, 1)}
    with pytest.raises(ValidationError):  # the shape check still runs against a spec
        decode_values(data, spec=bad, max_rank=ranker.bounds.max_rank)
