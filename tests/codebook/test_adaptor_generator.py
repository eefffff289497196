"""The adaptor and the DUET-style generator: output shapes follow the head spec, the
clipping bounds hold for any input (hypothesis), the GRU carries information across
layers, the initial edit is the identity, bad inputs are rejected."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from codebook.adaptor import (
    Adaptor,
    AdaptorConfig,
    DecoderConfig,
    EditDecoder,
    edit_norms,
    lowrank_norm,
    payload_values,
    unbatch,
)
from codebook.duet import DuetConfig, DuetGenerator
from recsys.errors import ValidationError

SPEC = {"fc0": (12, 8), "fc1": (8, 12)}
VOCAB = (6, 5, 4, 2)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_adaptor(**kw) -> Adaptor:
    base = dict(
        vocab_sizes=VOCAB,
        head_spec=SPEC,
        summary_dim=5,
        max_items=6,
        token_dim=8,
        code_dim=10,
        hidden=16,
        rank=3,
        max_weight_norm=0.7,
        max_bias_abs=0.05,
        dropout=0.0,
    )
    base.update(kw)
    torch.manual_seed(0)
    return Adaptor(AdaptorConfig(**base)).eval()


def random_codes(b: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, k, (b, n), generator=g) for k in VOCAB], dim=2)


def randomise_outputs(decoder: EditDecoder, scale: float) -> None:
    """Give the decoder non-zero (possibly huge) output weights, as after training."""
    torch.manual_seed(1)
    with torch.no_grad():
        for lin in decoder.out:
            lin.weight.normal_(0.0, scale)
            lin.bias.normal_(0.0, scale)


def test_output_shapes_follow_the_head_spec() -> None:
    model = tiny_adaptor()
    out = model(random_codes(4, 6), summary=torch.randn(4, 5))
    assert out.code.shape == (4, 10)
    expected = {
        "fc0.u": (4, 12, 3),
        "fc0.s": (4, 3),
        "fc0.v": (4, 8, 3),
        "fc0.bias": (4, 12),
        "fc1.u": (4, 8, 3),
        "fc1.s": (4, 3),
        "fc1.v": (4, 12, 3),
        "fc1.bias": (4, 8),
    }
    assert {k: tuple(v.shape) for k, v in out.tensors.items()} == expected
    row = unbatch(out.tensors, 2)
    assert row["fc0.u"].shape == (12, 3) and torch.equal(
        row["fc1.bias"], out.tensors["fc1.bias"][2]
    )
    assert payload_values(model.cfg.head_spec, 3) == sum(v[0].numel() for v in out.tensors.values())


def test_initial_edit_is_exactly_zero() -> None:
    out = tiny_adaptor()(random_codes(3, 6), summary=torch.randn(3, 5))
    for name in SPEC:
        assert torch.count_nonzero(out.tensors[f"{name}.s"]) == 0
        assert torch.count_nonzero(out.tensors[f"{name}.bias"]) == 0


@settings(max_examples=30, deadline=None)
@given(
    scale=st.floats(1e-3, 1e3),
    bound=st.floats(1e-2, 10.0),
    bias_bound=st.floats(1e-3, 1.0),
    seed=st.integers(0, 2**16),
)
def test_clipping_bound_holds_for_any_input(
    scale: float, bound: float, bias_bound: float, seed: int
) -> None:
    torch.set_num_threads(1)
    dec = EditDecoder(
        DecoderConfig(
            head_spec=SPEC,
            code_dim=6,
            hidden=8,
            rank=3,
            max_weight_norm=bound,
            max_bias_abs=bias_bound,
        )
    )
    randomise_outputs(dec, scale)
    g = torch.Generator().manual_seed(seed)
    code = torch.randn(5, 6, generator=g) * scale
    with torch.no_grad():
        out = dec(code)
    for name in SPEC:
        u, s, v = out[f"{name}.u"], out[f"{name}.s"], out[f"{name}.v"]
        dense = torch.bmm(u * s.unsqueeze(1), v.transpose(1, 2))  # [B, out, in]
        norms = torch.linalg.matrix_norm(dense.double())  # Frobenius
        assert float(norms.max()) <= bound * (1 + 1e-5)
        assert torch.allclose(lowrank_norm(u, s, v).double(), norms, rtol=1e-3, atol=1e-6)
        assert float(out[f"{name}.bias"].abs().max()) <= bias_bound
        assert torch.isfinite(dense).all()


def test_gru_conditions_each_layer_on_the_previous_one() -> None:
    model = tiny_adaptor()
    randomise_outputs(model.decoder, 0.3)
    code = torch.randn(2, 10)
    before = model.decode(code)
    with torch.no_grad():  # change only what enters the GRU at layer 1 (fc0)
        model.decoder.layer_embedding.weight[0] += 1.0
    after = model.decode(code)
    assert not torch.allclose(after["fc0.s"], before["fc0.s"])
    # fc1's own layer input is unchanged, yet its edit moves: the GRU state and the
    # projection of fc0's edit carry the change across layers
    assert not torch.allclose(after["fc1.s"], before["fc1.s"])
    assert not torch.allclose(after["fc1.u"], before["fc1.u"])
    # and the previous-edit path alone also reaches fc1
    with torch.no_grad():
        model.decoder.prev[0].weight.zero_()
        model.decoder.prev[0].bias.fill_(0.5)
    assert not torch.allclose(model.decode(code)["fc1.s"], after["fc1.s"])


def test_scores_weight_the_pooling_and_padding_is_ignored() -> None:
    model = tiny_adaptor()
    codes = random_codes(1, 6)
    summary = torch.zeros(1, 5)
    uniform = model.encode(codes, None, summary)
    peaked = model.encode(codes, torch.tensor([[9.0, 0, 0, 0, 0, 0]]), summary)
    assert not torch.allclose(uniform, peaked)
    padded = codes.clone()
    padded[0, 3:] = -1  # three valid items, three padding rows
    short = model.encode(codes[:, :3], None, summary)
    assert torch.allclose(model.encode(padded, None, summary), short, atol=1e-6)
    model_no_w = tiny_adaptor(score_weighting=False)
    assert torch.allclose(
        model_no_w.encode(codes, None, summary),
        model_no_w.encode(codes, torch.tensor([[9.0, 0, 0, 0, 0, 0]]), summary),
    )


def test_adaptor_rejects_bad_inputs() -> None:
    model = tiny_adaptor()
    with pytest.raises(ValidationError, match="codes must be"):
        model(torch.zeros(2, 3, dtype=torch.int64), summary=torch.zeros(2, 5))
    too_big = random_codes(1, 2)
    too_big[0, 0, 0] = VOCAB[0]
    with pytest.raises(ValidationError, match="outside"):
        model(too_big, summary=torch.zeros(1, 5))
    with pytest.raises(ValidationError, match="summary"):
        model(random_codes(1, 2))
    with pytest.raises(ValidationError, match="rank"):
        AdaptorConfig(vocab_sizes=VOCAB, head_spec=SPEC, rank=9)
    with pytest.raises(ValidationError, match="max_weight_norm: Input should be greater than 0"):
        AdaptorConfig(vocab_sizes=VOCAB, head_spec=SPEC, rank=2, max_weight_norm=0.0)
    cfg = AdaptorConfig(vocab_sizes=VOCAB, head_spec=SPEC, rank=2)
    assert AdaptorConfig.from_dict(cfg.to_dict()) == cfg


# adaptor_config / duet_config as artefacts saved them before the configs were pydantic
# dataclasses (JSON lists; the DUET one without item_dim/table_dim, as older artefacts)
SAVED_ADAPTOR = {
    "vocab_sizes": [64, 64, 64, 3],
    "head_spec": [["fc0", 128, 64], ["fc1", 64, 128]],
    "summary_dim": 128,
    "max_items": 20,
    "token_dim": 32,
    "code_dim": 64,
    "hidden": 128,
    "rank": 8,
    "max_weight_norm": 2.807502698898315,
    "max_bias_abs": 0.23184925168752668,
    "edit_bias": True,
    "score_weighting": True,
    "dropout": 0.1,
}
SAVED_DUET = {
    "num_items": 1682,
    **{k: v for k, v in SAVED_ADAPTOR.items() if k not in ("vocab_sizes", "token_dim")},
}
SAVED_DUET.pop("score_weighting")


def test_saved_generator_configs_still_load() -> None:
    cfg = AdaptorConfig.from_dict(SAVED_ADAPTOR)
    assert cfg.vocab_sizes == (64, 64, 64, 3)
    assert cfg.head_spec == (("fc0", 128, 64), ("fc1", 64, 128))
    assert cfg.to_dict() == {**SAVED_ADAPTOR, "vocab_sizes": (64, 64, 64, 3),
                             "head_spec": cfg.head_spec}  # fmt: skip
    assert cfg.decoder_config().max_weight_norm == SAVED_ADAPTOR["max_weight_norm"]
    duet = DuetConfig.from_dict(SAVED_DUET)
    assert (duet.num_items, duet.item_dim, duet.table_dim, duet.rank) == (1682, 32, None, 8)
    assert DuetConfig.from_dict(json.loads(json.dumps(duet.to_dict()))) == duet


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"dropout": 1.0}, "AdaptorConfig: dropout: Input should be less than 1 (got 1.0)"),
        ({"vocab_sizes": [64, 0]}, "vocab_sizes.1: Input should be greater than or equal to 1"),
        ({"vocab_sizes": []}, "vocab_sizes: Tuple should have at least 1 item"),
        ({"head_spec": {"fc0": (0, 4)}}, "head_spec: head layer 'fc0': bad shape (0, 4)"),
        ({"rank": 65}, "AdaptorConfig: rank must be in 1..64 for this head, got 65"),
        ({"colour": "red"}, "colour: Unexpected keyword argument"),
    ],
)
def test_bad_generator_configs_name_the_field(change: dict, needle: str) -> None:
    with pytest.raises(ValidationError) as err:
        AdaptorConfig.from_dict({**SAVED_ADAPTOR, **change})
    assert needle in str(err.value)
    with pytest.raises(ValidationError, match="num_items: Input should be greater than or"):
        DuetConfig.from_dict({**SAVED_DUET, "num_items": 0})


def test_duet_generator_shapes_bounds_and_table_init() -> None:
    table = torch.randn(30, 7)
    cfg = DuetConfig(
        num_items=30,
        head_spec=SPEC,
        summary_dim=5,
        max_items=4,
        item_dim=6,
        table_dim=7,
        code_dim=10,
        hidden=16,
        rank=2,
        max_weight_norm=0.4,
        max_bias_abs=0.02,
        dropout=0.0,
    )
    gen = DuetGenerator(cfg, init_table=table).eval()
    assert torch.equal(gen.item_embedding.weight, table)
    randomise_outputs(gen.decoder, 5.0)
    ids = torch.tensor([[3, 7, 29, -1], [0, -1, -1, -1]])
    with torch.no_grad():
        out = gen(ids, None, torch.randn(2, 5))
    assert out.tensors["fc1.v"].shape == (2, 12, 2) and out.code.shape == (2, 10)
    for name, norm in edit_norms(out.tensors, cfg.head_spec).items():
        assert float(norm.max()) <= 0.4 * (1 + 1e-5), name
        assert float(out.tensors[f"{name}.bias"].abs().max()) <= 0.02
    # a fresh generator from the saved config loads the trained state (same table width)
    again = DuetGenerator(DuetConfig.from_dict(cfg.to_dict()))
    again.load_state_dict(gen.state_dict())
    with pytest.raises(ValidationError, match="item id"):
        gen(torch.tensor([[30]]), None, torch.zeros(1, 5))
    with pytest.raises(ValidationError, match="init_table"):
        DuetGenerator(cfg, init_table=torch.zeros(29, 7))
