"""Prototypes: faiss k-means of edit codes, bounded prototype + residual edits, online
refinement that appends versions in the store, spawning, "what changed since v"."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from codebook.adaptor import DecoderConfig, EditDecoder, lowrank_norm
from codebook.prototypes import (
    PrototypeBank,
    PrototypeConfig,
    clip_lowrank,
    dense_delta,
    fit_prototypes,
    residual_edit,
)
from codebook.store import PrototypeStore
from recsys.errors import ValidationError

SPEC = (("fc0", 12, 8), ("fc1", 8, 12))
BOUND, BIAS = 1.0, 0.1


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def decoder() -> EditDecoder:
    torch.manual_seed(0)
    dec = EditDecoder(
        DecoderConfig(
            head_spec=SPEC, code_dim=4, hidden=8, rank=2, max_weight_norm=0.9, max_bias_abs=0.09
        )
    )
    with torch.no_grad():  # a "trained" decoder: non-zero s and bias
        for lin in dec.out:
            lin.weight.normal_(0, 0.5)
            lin.bias.normal_(0, 0.5)
    return dec.eval()


@pytest.fixture
def store(tmp_path: Path):
    with PrototypeStore.open(f"sqlite:///{tmp_path / 'protos.sqlite'}", upgrade=True) as s:
        yield s


def blobs(seed: int = 0) -> np.ndarray:
    """float32 [120, 4]: three well separated groups of 40 codes."""
    rng = np.random.default_rng(seed)
    centres = np.array([[4, 0, 0, 0], [0, 4, 0, 0], [0, 0, 4, 0]], dtype=np.float32)
    return (centres.repeat(40, 0) + 0.1 * rng.normal(size=(120, 4))).astype(np.float32)


def flat_of(decoder: EditDecoder, codes: np.ndarray) -> list[dict[str, torch.Tensor]]:
    with torch.no_grad():
        out = decoder(torch.from_numpy(codes))
    return [{k: v[i] for k, v in out.items()} for i in range(len(codes))]


def test_kmeans_recovers_the_groups() -> None:
    codes = blobs()
    cents, info = fit_prototypes(codes, PrototypeConfig(num_prototypes=3, seed=0))
    assert cents.shape == (3, 4) and sorted(info["sizes"]) == [40, 40, 40]
    again, _ = fit_prototypes(codes, PrototypeConfig(num_prototypes=3, seed=0))
    assert np.array_equal(cents, again)  # seeded
    with pytest.raises(ValidationError, match="at least"):
        fit_prototypes(codes[:2], PrototypeConfig(num_prototypes=3))


def test_prototype_config_ranges_and_saved_dicts() -> None:
    saved = PrototypeConfig().to_dict()  # as artefacts store it (config.prototypes)
    assert PrototypeConfig(**saved) == PrototypeConfig()
    with pytest.raises(ValidationError, match=r"residual_share: Input should be less than 1"):
        PrototypeConfig(residual_share=1.0)
    with pytest.raises(ValidationError, match=r"spawn_fraction: Input should be greater than 0"):
        PrototypeConfig(spawn_fraction=0.0)
    with pytest.raises(ValidationError, match=r"refine_every: .* greater than or equal to 1"):
        PrototypeConfig(**{**saved, "refine_every": 0})


def test_residual_and_prototype_stay_within_their_shares(decoder: EditDecoder) -> None:
    user, proto = flat_of(decoder, blobs()[[0, 50]])
    proto = clip_lowrank(proto, SPEC, 0.5 * BOUND, 0.5 * BIAS)
    res, norm = residual_edit(user, proto, SPEC, rank=2, bound=0.5 * BOUND, bias_bound=0.5 * BIAS)
    assert norm > 0
    for name, _, _ in SPEC:
        total = dense_delta(proto, name) + dense_delta(res, name)
        assert float(torch.linalg.matrix_norm(total)) <= BOUND + 1e-5
        assert float((proto[f"{name}.bias"] + res[f"{name}.bias"]).abs().max()) <= BIAS + 1e-6
        assert res[f"{name}.u"].shape[1] == 2  # residual rank
    # without clipping and at full rank the residual reconstructs the user's edit exactly
    exact, _ = residual_edit(user, proto, SPEC, rank=8, bound=1e9, bias_bound=1e9)
    for name, _, _ in SPEC:
        assert torch.allclose(
            dense_delta(proto, name) + dense_delta(exact, name), dense_delta(user, name), atol=1e-5
        )


def fitted_bank(
    store: PrototypeStore, decoder: EditDecoder, cfg: PrototypeConfig, codes: np.ndarray
) -> PrototypeBank:
    """k-means of ``codes`` stored as version 1, with training residual norms measured."""
    cents, _ = fit_prototypes(codes, cfg)
    return PrototypeBank.create(
        store,
        cents,
        decoder,
        SPEC,
        cfg,
        bound=BOUND,
        bias_bound=BIAS,
        train_codes=codes,
        train_edits=lambda c: flat_of(decoder, c),
    )


def test_bank_refines_versions_and_answers_what_changed(
    decoder: EditDecoder, store: PrototypeStore
) -> None:
    codes = blobs()
    cfg = PrototypeConfig(num_prototypes=3, refine_every=5, spawn_threshold=1e9, seed=0)
    bank = fitted_bank(store, decoder, cfg, codes)
    assert len(store.list_prototypes()) == 3
    pid = bank.assign(codes[0])
    v1, edit1 = bank.edit(pid)
    assert v1 == 1
    for name, _, _ in SPEC:  # prototype edits get (1 - rho) of the bound
        n = lowrank_norm(
            edit1[f"{name}.u"][None], edit1[f"{name}.s"][None], edit1[f"{name}.v"][None]
        )
        assert float(n) <= 0.5 * BOUND + 1e-5
    start = store.get_prototype(pid)
    shifted = codes[0] + np.array([0.0, 0.0, 0.0, 1.0], np.float32)
    for k in range(10):
        _, norm = bank.residual(flat_of(decoder, shifted[None])[0], pid)
        bank.observe(f"dev-{k}", shifted, norm, pid)
    assert bank.edit(pid)[0] == 3  # two refinements of 5 edits each
    changes = store.changes_since(pid, 1)
    assert [c.version for c in changes] == [2, 3] and {c.reason for c in changes} == {"refine"}
    latest = store.get_prototype(pid)
    # running mean with the stored member count: the code moved towards the new members
    expect = start.code.astype(np.float64)
    n = start.member_count
    for _ in range(2):
        expect = (n * expect + 5 * shifted) / (n + 5)
        n += 5
    assert np.allclose(latest.code, expect, atol=1e-5)
    assert latest.member_count == start.member_count + 10
    assert set(latest.tensors) == set(edit1)  # the decoded edit travels with each version
    assert not np.allclose(latest.tensors["fc0.s"], start.tensors["fc0.s"])
    assert store.get_device_assignment("dev-3").prototype_id == pid
    assert store.changes_since(pid, 3) == []
    # a bank loaded from the store sees the same current versions
    again = PrototypeBank.load(store, decoder, SPEC, cfg, bound=BOUND, bias_bound=BIAS)
    assert again.edit(pid)[0] == 3 and np.allclose(again.codes()[1], bank.codes()[1])


def test_persistently_far_members_spawn_a_prototype(
    decoder: EditDecoder, store: PrototypeStore
) -> None:
    codes = blobs()
    cfg = PrototypeConfig(
        num_prototypes=3,
        refine_every=100,
        spawn_window=6,
        spawn_fraction=0.5,
        spawn_quantile=0.9,
        seed=0,
    )
    bank = fitted_bank(store, decoder, cfg, codes)
    assert np.isfinite(bank.spawn_threshold)
    pid = bank.assign(codes[0])
    near = codes[0]
    _, near_norm = bank.residual(flat_of(decoder, near[None])[0], pid)
    assert near_norm <= bank.spawn_threshold
    for k in range(5):  # members close to the prototype: nothing happens
        assert bank.observe(f"near-{k}", near, near_norm, pid) == []
    far_code = np.array([-5, -5, 5, 5], np.float32)
    changes = []
    for k in range(6):
        changes += bank.observe(f"far-{k}", far_code, bank.spawn_threshold * 3, pid)
    spawned = [c for c in changes if c.kind == "spawn"]
    assert len(spawned) == 1 and len(bank.prototype_ids) == 4
    new = store.get_prototype(spawned[0].prototype_id)
    assert new.reason == "spawn" and new.parent is not None and new.parent.prototype_id == pid
    assert np.allclose(new.code, far_code)
    assert bank.assign(far_code) == spawned[0].prototype_id
