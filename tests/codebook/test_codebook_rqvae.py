"""RQ-VAE: shapes, training improves reconstruction, determinism, dead-code reset, persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from codebook.quantizer import ResidualQuantizer, relative_mse
from codebook.rqvae import RQVAE, ResidualVQ, RQVAEConfig, RQVAEQuantizer, train_rqvae
from recsys.errors import ValidationError

FAST = {"epochs": 30, "batch_size": 64, "hidden": [32], "latent_dim": 8}


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 16),
    dim=st.integers(1, 8),
    levels=st.integers(1, 4),
    codes=st.integers(1, 10),
)
def test_residual_vq_shapes(batch, dim, levels, codes) -> None:
    torch.manual_seed(0)
    rvq = ResidualVQ(levels, codes, dim)
    z = torch.randn(batch, dim, requires_grad=True)
    z_q, c, loss = rvq(z)
    assert z_q.shape == (batch, dim) and c.shape == (batch, levels) and loss.ndim == 0
    assert int(c.min()) >= 0 and int(c.max()) < codes
    assert torch.allclose(rvq.lookup(c), z_q)
    loss.backward()  # gradient reaches the encoder side (commitment) and the codebooks
    assert z.grad is not None and rvq.codebooks.grad is not None


def test_model_forward_shapes() -> None:
    model = RQVAE(20, RQVAEConfig(codes=6, latent_dim=4, hidden=[16]))
    out = model(torch.randn(5, 20))
    assert out["x_hat"].shape == (5, 20) and out["codes"].shape == (5, 3)
    assert out["loss"].ndim == 0


def test_training_learns_and_uses_all_codes(vectors) -> None:
    q = train_rqvae(vectors, RQVAEConfig(codes=8, seed=0, **{**FAST, "epochs": 60}))
    assert isinstance(q, ResidualQuantizer)
    codes = q.encode(vectors)
    assert codes.shape == (len(vectors), 3) and codes.dtype == np.int64
    assert q.decode(codes).shape == vectors.shape
    assert q.decode(codes[:, :1]).shape == vectors.shape
    first, last = q.history[0], q.history[-1]
    assert last["recon"] < first["recon"]
    predict_mean = relative_mse(vectors, np.broadcast_to(vectors.mean(0), vectors.shape))
    assert relative_mse(vectors, q.decode(codes)) < 0.5 * predict_mean
    assert all(len(np.unique(codes[:, level])) >= 6 for level in range(3))


def test_same_seed_same_model(vectors) -> None:
    a = train_rqvae(vectors, RQVAEConfig(codes=8, seed=5, **FAST))
    b = train_rqvae(vectors, RQVAEConfig(codes=8, seed=5, **FAST))
    assert np.array_equal(a.encode(vectors), b.encode(vectors))
    for (name, pa), pb in zip(
        a.model.state_dict().items(), b.model.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name


def test_dead_code_reset_revives_unused_codes() -> None:
    torch.manual_seed(0)
    rvq = ResidualVQ(levels=2, codes=8, dim=4)
    z = torch.randn(64, 4)
    with torch.no_grad():
        rvq.codebooks[0, 5:] = 1e3  # three codes no item can reach
    codes, _ = rvq.assign(z)
    used = torch.zeros(2, 8, dtype=torch.bool)
    for level in range(2):
        used[level, codes[:, level]] = True
    assert not used[0, 5:].any()
    resets = rvq.reset_dead_codes(z, used)
    assert resets >= 3
    after, _ = rvq.assign(z)
    assert set(range(5, 8)) <= set(after[:, 0].tolist())  # every revived code wins an item
    assert len(torch.unique(after[:, 0])) == 8


def test_dead_code_reset_during_training(make_vectors) -> None:
    """Without k-means init the random codebook leaves codes dead; periodic resets revive them."""
    x = make_vectors(200, 16, 10, seed=4) * 5.0
    common = {**FAST, "kmeans_init": False, "codes": 16, "seed": 1, "epochs": 20}
    without = train_rqvae(x, RQVAEConfig(reset_every=0, **common))
    with_reset = train_rqvae(x, RQVAEConfig(reset_every=2, settle_fraction=0.2, **common))
    used_without = sum(len(np.unique(without.encode(x)[:, lv])) for lv in range(3))
    used_with = sum(len(np.unique(with_reset.encode(x)[:, lv])) for lv in range(3))
    assert sum(row["resets"] for row in with_reset.history) > 0
    assert used_with > used_without


def test_save_load_round_trip(vectors, tmp_path: Path) -> None:
    q = train_rqvae(vectors, RQVAEConfig(codes=8, **FAST))
    q.save(tmp_path)
    back = RQVAEQuantizer.load(tmp_path)
    assert np.array_equal(back.encode(vectors), q.encode(vectors))
    assert np.allclose(back.decode(q.encode(vectors)), q.decode(q.encode(vectors)))
    assert back.config.latent_dim == FAST["latent_dim"]


def test_config_errors(vectors) -> None:
    with pytest.raises(ValidationError, match="beta"):
        train_rqvae(vectors, RQVAEConfig(beta=-1.0))
    with pytest.raises(ValidationError, match="exceeds"):
        train_rqvae(vectors[:5], RQVAEConfig(codes=8))
