"""Edits applied in factored form: the same scores as the dense form, the same refusals."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from device_ranker.edit_apply import keeps_factored, prepare_decoded, prepare_edit
from device_ranker.edits import EditBounds, HeadEdit, LayerEdit, random_edit
from device_ranker.head import EditableHead, EditedWeights, head_forward, queries_per_user
from device_ranker.model import SeqRanker
from device_ranker.ranker import Ranker
from recsys.edit_payload import decode_values, encode_payload
from recsys.errors import ValidationError

HISTORIES = [[1, 2, 3], [], [4, 5, 6, 7, 8, 9, 10]]


def _edit(head: EditableHead, rank: int, seed: int = 0, scale: float = 0.01) -> HeadEdit:
    return random_edit(head, rank=rank, scale=scale, generator=torch.Generator().manual_seed(seed))


def test_factored_scores_equal_dense_scores(tiny_model: SeqRanker) -> None:
    ranker = Ranker(tiny_model)
    edit = _edit(tiny_model.head, rank=3)
    prepared = ranker.prepare(edit)
    assert all(lay.a is not None for lay in prepared.weights.layers)  # kept factored
    states = ranker.user_states(HISTORIES)  # [B, D]
    head = tiny_model.head
    with torch.inference_mode():
        fact = prepared.weights.forward(states, head.residual, mode="factored")
        dense = head_forward(states, tuple(prepared.weights), head.residual)  # materialised
        manual = [
            (w + le.delta_weight(), b + le.bias)
            for (w, b), le in zip(head.base_weights(), edit.layers.values(), strict=True)
        ]
        merged = head_forward(states, manual, head.residual)
    torch.testing.assert_close(fact, dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fact, merged, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        ranker.scores(HISTORIES, edit=prepared),
        tiny_model.item_scores(dense),
        rtol=1e-5,
        atol=1e-5,
    )


def test_single_edit_materialises_once_it_has_paid_for_itself(tiny_model: SeqRanker) -> None:
    head = tiny_model.head
    weights = prepare_edit(head, _edit(head, rank=2)).weights
    dense_flops, row_flops = weights.flops()
    rows_to_pay = -(-dense_flops // row_flops)  # ceil: FLOPs of materialising, in rows
    x = torch.randn(1, head.dims[0])
    first = weights.forward(x, head.residual)
    assert not weights.materialised
    for _ in range(rows_to_pay):
        weights.forward(x, head.residual)
    assert weights.materialised
    torch.testing.assert_close(weights.forward(x, head.residual), first, rtol=1e-5, atol=1e-6)
    big = EditedWeights(prepare_edit(head, _edit(head, rank=2)).weights.layers)
    big.forward(torch.randn(rows_to_pay, head.dims[0]), head.residual)  # one big batch
    assert big.materialised


def test_per_user_rows_mix_ranks_base_and_dense_edits(tiny_model: SeqRanker) -> None:
    head = tiny_model.head
    out_f, in_f = head.edit_spec()["fc1"]
    dense_edit = HeadEdit({"fc1": LayerEdit(dense=torch.randn(out_f, in_f) * 0.01)})
    sets = [
        prepare_edit(head, _edit(head, rank=1)).weights,
        None,
        prepare_edit(head, _edit(head, rank=4, seed=3)).weights,
        prepare_edit(head, dense_edit).weights,  # a fine-tuned head: its own W, no factors
        tuple(prepare_edit(head, _edit(head, rank=2, seed=5)).weights),  # plain (W, b) list
    ]
    x = torch.randn(len(sets), head.dims[0])
    with torch.inference_mode():
        batched = queries_per_user(head, x, sets)
        for row, w in enumerate(sets):
            one = head_forward(
                x[row : row + 1], head.base_weights() if w is None else tuple(w), head.residual
            )
            torch.testing.assert_close(batched[row : row + 1], one, rtol=1e-5, atol=1e-6)


def test_large_ranks_and_dense_parts_are_materialised() -> None:
    head = EditableHead((8, 16, 8))
    assert keeps_factored(16, 8, 5, False, EditBounds())  # 5 * 24 < 128
    assert not keeps_factored(16, 8, 6, False, EditBounds())  # 6 * 24 >= 128
    assert not keeps_factored(16, 8, 2, True, EditBounds())  # with a dense part
    assert not keeps_factored(16, 8, 2, False, EditBounds(max_weight_abs=1.0))
    prepared = prepare_edit(head, _edit(head, rank=6))
    assert all(lay.a is None for lay in prepared.weights.layers)
    x = torch.randn(3, 8)
    manual = [
        (w + le.delta_weight(), b + le.bias)
        for (w, b), le in zip(head.base_weights(), prepared.edit.layers.values(), strict=True)
    ]
    torch.testing.assert_close(head(x, prepared.weights), head(x, manual))


@settings(max_examples=40, deadline=None)
@given(rank=st.integers(1, 4), scale=st.floats(1e-3, 0.2), seed=st.integers(0, 1000))
def test_gram_norm_refuses_exactly_what_the_dense_norm_refuses(
    rank: int, scale: float, seed: int
) -> None:
    torch.manual_seed(0)
    head = EditableHead((8, 16, 8))
    bounds = EditBounds(max_weight_norm=0.3, max_bias_abs=1.0)
    edit = _edit(head, rank=rank, seed=seed, scale=scale)
    norms = [float(le.delta_weight().norm()) for le in edit.layers.values()]
    if any(abs(n - 0.3) < 1e-5 for n in norms):
        return  # at the bound itself the two float orders may differ in the last bit
    within = all(n <= 0.3 for n in norms)
    try:
        prepare_edit(head, edit, bounds)
    except ValidationError as err:
        assert not within and "||dW||_F" in str(err)
        return
    assert within


def _payload(edit: HeadEdit, **kw) -> bytes:
    return encode_payload(edit.to_flat(), dtype="fp32", **kw)


def test_prepare_decoded_equals_prepare_edit(tiny_model: SeqRanker) -> None:
    head = tiny_model.head
    spec, bounds = head.edit_spec(), EditBounds()
    proto, residual = _edit(head, rank=3, seed=1), _edit(head, rank=2, seed=2)
    for edit, prototype in ((residual, None), (residual, proto)):
        decoded = decode_values(_payload(edit), spec=spec, max_rank=bounds.max_rank)
        fast = prepare_decoded(head, decoded, bounds, prototype)
        whole = edit if prototype is None else HeadEdit.compose(prototype, edit)
        slow = prepare_edit(head, whole, bounds)
        assert dict(fast.edit.layers) == dict(whole.layers)  # built on demand
        for a, b in zip(fast.weights, slow.weights, strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("bounds", "match"),
    [
        (EditBounds(max_weight_norm=1e-4), r"\|\|dW\|\|_F = .* > bound"),
        (EditBounds(max_bias_abs=1e-6), "bias delta has max"),
        (EditBounds(max_rank=4), "length r in 1..4"),  # 3 + 2 composed
    ],
)
def test_prepare_decoded_refuses_with_the_same_errors(
    tiny_model: SeqRanker, bounds: EditBounds, match: str
) -> None:
    head = tiny_model.head
    proto, residual = _edit(head, rank=3, seed=1), _edit(head, rank=2, seed=2)
    decoded = decode_values(_payload(residual), spec=head.edit_spec(), max_rank=bounds.max_rank)
    with pytest.raises(ValidationError, match=match):
        prepare_decoded(head, decoded, bounds, proto)
    with pytest.raises(ValidationError, match=match):
        prepare_edit(head, HeadEdit.compose(proto, residual), bounds)


def test_prepare_decoded_needs_the_heads_layers(tiny_model: SeqRanker) -> None:
    edit = HeadEdit({"fc7": LayerEdit(bias=torch.zeros(4))})
    decoded = decode_values(_payload(edit))  # no spec: decoding alone cannot know
    with pytest.raises(ValidationError, match="unknown head layer 'fc7'"):
        prepare_decoded(tiny_model.head, decoded)


def test_a_held_prototype_is_checked_again_under_other_bounds(tiny_model: SeqRanker) -> None:
    head = tiny_model.head
    proto, residual = _edit(head, rank=3, seed=1), _edit(head, rank=1, seed=2)
    decoded = decode_values(_payload(residual), spec=head.edit_spec(), max_rank=8)
    prepare_decoded(head, decoded, EditBounds(), proto)  # checked and cached
    with pytest.raises(ValidationError, match=r"length r in 1\.\.2"):  # the prototype alone
        prepare_decoded(head, decoded, EditBounds(max_rank=2), proto)


def test_service_mode_materialises_a_users_edit_once_it_has_paid(tiny_model: SeqRanker) -> None:
    head = tiny_model.head
    mine, other = (prepare_edit(head, _edit(head, rank=2, seed=s)).weights for s in (1, 2))
    x = torch.randn(2, head.dims[0])
    with torch.inference_mode():
        first = queries_per_user(head, x, [mine, other], "auto")
        dense_flops, row_flops = mine.flops()
        for _ in range(-(-dense_flops // row_flops)):
            queries_per_user(head, x[:1], [mine], "auto")  # B=1 requests of one user
        assert mine.materialised and not other.materialised
        again = queries_per_user(head, x, [mine, other], "auto")  # one dense row, one factored
        torch.testing.assert_close(again, first, rtol=1e-5, atol=1e-6)
        fresh = prepare_edit(head, _edit(head, rank=2, seed=3)).weights
        queries_per_user(head, x, [fresh, other])  # the default (the replay's) never charges
        assert fresh._rows == 0


@pytest.mark.parametrize(
    ("bounds", "match"),
    [
        (EditBounds(max_weight_norm=1e-4), r"\|\|dW\|\|_F = .* > bound"),
        (EditBounds(max_bias_abs=1e-6), "bias delta has max"),
        (EditBounds(max_rank=1), r"rank 2 outside 1\.\.1"),
    ],
)
def test_prepare_decoded_without_prototype_refuses_like_prepare_edit(
    tiny_model: SeqRanker, bounds: EditBounds, match: str
) -> None:
    head = tiny_model.head
    edit = _edit(head, rank=2, seed=2)
    decoded = decode_values(_payload(edit))  # no spec: the plan checks shapes and rank
    with pytest.raises(ValidationError, match=match):
        prepare_decoded(head, decoded, bounds)
    if bounds.max_rank > 1:
        with pytest.raises(ValidationError, match=match):
            prepare_edit(head, edit, bounds)


def test_prepare_decoded_accepts_what_only_the_cheap_norm_bound_doubts(
    tiny_model: SeqRanker,
) -> None:
    """The fast path clears ``||A||_F ||V||_F <= bound``; an edit above that but within
    the exact ``||A V^T||_F`` (orthogonal factors) goes to the exact check and passes."""
    head = tiny_model.head
    out_f, in_f = head.edit_spec()["fc0"]
    u = torch.zeros(out_f, 2)
    v = torch.zeros(in_f, 2)
    u[0, 0] = u[1, 1] = 1.0
    v[0, 0] = v[1, 1] = 1.0  # A V^T = diag(s) on two entries: ||dW||_F = sqrt(2) s
    edit = HeadEdit({"fc0": LayerEdit(u=u, s=torch.tensor([1.0, 1.0]), v=v)})
    bounds = EditBounds(max_weight_norm=1.5)  # ||A||_F ||V||_F = 2 > 1.5 >= sqrt(2)
    fast = prepare_decoded(head, decode_values(_payload(edit)), bounds)
    slow = prepare_edit(head, edit, bounds)
    for a, b in zip(fast.weights, slow.weights, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValidationError, match=r"\|\|dW\|\|_F"):
        prepare_decoded(head, decode_values(_payload(edit)), EditBounds(max_weight_norm=1.4))


def test_prepare_decoded_follows_a_replaced_bias_storage(tiny_model: SeqRanker) -> None:
    """The plan keeps a numpy view of each base bias; a bias whose storage was replaced
    (``param.data = ...``) is read afresh, not through the stale view."""
    head = tiny_model.head
    edit = _edit(head, rank=2, seed=4)
    data = _payload(edit)
    prepare_decoded(head, decode_values(data))  # plan cached
    fc0 = head.layers["fc0"]
    fc0.bias.data = torch.full_like(fc0.bias, 3.0)
    fresh = prepare_decoded(head, decode_values(data))
    torch.testing.assert_close(
        fresh.weights.layers[0].b, fc0.bias.detach() + edit.layers["fc0"].bias
    )


def test_prepare_decoded_accepts_a_bias_only_the_cheap_bound_doubts(tiny_model: SeqRanker) -> None:
    """``||db||_2`` over the element bound but every element within it: accepted (exact
    check); one element over it: refused, naming the bias."""
    head = tiny_model.head
    out_f = head.edit_spec()["fc1"][0]
    db = torch.full((out_f,), 0.4)  # ||db||_2 = 0.4 sqrt(out) > 0.5 >= max|db|
    edit = HeadEdit({"fc1": LayerEdit(bias=db)})
    fast = prepare_decoded(head, decode_values(_payload(edit)), EditBounds(max_bias_abs=0.5))
    torch.testing.assert_close(fast.weights.layers[1].b, head.layers["fc1"].bias.detach() + db)
    db[3] = 0.6
    with pytest.raises(ValidationError, match="bias delta has max"):
        prepare_decoded(head, decode_values(_payload(edit)), EditBounds(max_bias_abs=0.5))


def test_composed_fast_path_equals_prepare_edit_for_every_mix_of_parts(
    tiny_model: SeqRanker,
) -> None:
    """Residual and prototype each with a low-rank part, only a bias, or nothing in a
    layer (and a dense prototype layer): the composed weights equal ``prepare_edit`` of
    ``HeadEdit.compose``; a composed rank over the bound is refused the same way."""
    head = tiny_model.head
    spec = head.edit_spec()
    full = _edit(head, rank=2, seed=7)
    lr = {n: LayerEdit(u=le.u, s=le.s, v=le.v) for n, le in full.layers.items()}
    bias = {n: LayerEdit(bias=le.bias) for n, le in full.layers.items()}
    out_f, in_f = spec["fc1"]
    dense = LayerEdit(dense=torch.randn(out_f, in_f) * 0.01)
    protos = [
        _edit(head, rank=3, seed=8),
        HeadEdit({"fc0": bias["fc0"]}),
        HeadEdit({"fc1": lr["fc1"]}),
        HeadEdit({"fc0": _edit(head, rank=1, seed=9).layers["fc0"], "fc1": dense}),
    ]
    residuals = [full, HeadEdit({"fc0": lr["fc0"]}), HeadEdit({"fc1": bias["fc1"]})]
    bounds = EditBounds()
    for proto in protos:
        for residual in residuals:
            decoded = decode_values(_payload(residual), spec=spec, max_rank=bounds.max_rank)
            fast = prepare_decoded(head, decoded, bounds, proto)
            slow = prepare_edit(head, HeadEdit.compose(proto, residual), bounds)
            for a, b in zip(fast.weights, slow.weights, strict=True):
                torch.testing.assert_close(a, b)
    decoded = decode_values(_payload(full), spec=spec, max_rank=8)
    with pytest.raises(ValidationError, match=r"length r in 1\.\.4"):
        prepare_decoded(head, decoded, EditBounds(max_rank=4), protos[0])  # 3 + 2


def test_composed_fast_path_accepts_what_only_the_cheap_bound_doubts(
    tiny_model: SeqRanker,
) -> None:
    head = tiny_model.head
    out_f, in_f = head.edit_spec()["fc0"]

    def unit(i: int) -> HeadEdit:  # A V^T = e_i e_i^T: norm 1 each, orthogonal to the other
        u, v = torch.zeros(out_f, 1), torch.zeros(in_f, 1)
        u[i, 0] = v[i, 0] = 1.0
        return HeadEdit({"fc0": LayerEdit(u=u, s=torch.ones(1), v=v)})

    proto, residual = unit(0), unit(1)  # composed ||dW||_F = sqrt(2); cheap bound 2
    bounds = EditBounds(max_weight_norm=1.5)
    decoded = decode_values(_payload(residual))
    fast = prepare_decoded(head, decoded, bounds, proto)
    slow = prepare_edit(head, HeadEdit.compose(proto, residual), bounds)
    for a, b in zip(fast.weights, slow.weights, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValidationError, match=r"\|\|dW\|\|_F"):
        prepare_decoded(head, decoded, EditBounds(max_weight_norm=1.4), proto)
