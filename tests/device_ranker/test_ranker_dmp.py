"""Sharded training (TorchRec DistributedModelParallel, 2 processes, gloo) against the
single-process run: same seed, same data order -> the same loss at every step.

Tolerance: relative 1e-5 per step (measured: at most 1.1e-7, float summation order).
Dropout is 0 (each rank draws its own masks, so runs with dropout differ per step).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ranker_helpers import make_dataset, tiny_model_config, tiny_train_config

from device_ranker.distributed_train import (
    DistributedConfig,
    _rank_batch,
    check_config,
    train_distributed,
)
from device_ranker.features import history_kjt
from device_ranker.train import load_checkpoint, model_from_checkpoint, train
from recsys.cli import main
from recsys.data import Dataset, user_sequences, write_dataset
from recsys.errors import ValidationError

REL_TOL = 1e-5


def _cfg(**kw):
    return tiny_train_config(
        epochs=1,
        model=tiny_model_config(num_items=0, dropout=0.0),
        embedding_optimizer="adagrad",
        embedding_lr=0.05,
        **kw,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sharding", "loss", "planned"),
    [
        # the planner's pick on CPU: 15 rows per rank
        ("auto", "ce", "row_wise/fused ranks [0, 1] shards [(15, 8), (15, 8)]"),
        # one table: it lives on rank 0; bce: the sampled negatives are sliced per rank
        ("table_wise", "bce", "table_wise/fused ranks [0] shards [(30, 8)]"),
        ("column_wise", "ce", "column_wise/fused ranks [0, 1] shards [(30, 4), (30, 4)]"),
    ],
)
def test_sharded_loss_matches_single_process(
    tiny_ds: Dataset, tmp_path, sharding: str, loss: str, planned: str
) -> None:
    cfg = _cfg(loss=loss)
    local: list[float] = []
    ref = train(cfg, tiny_ds, progress=False, on_step=lambda _e, v: local.append(v))
    ckpt = tmp_path / "ranker.pt"
    out = train_distributed(
        cfg,
        tiny_ds,
        DistributedConfig(world_size=2, sharding=sharding),
        checkpoint_path=ckpt,
        progress=False,
    )
    assert out is not None
    assert out.plan["item"] == planned
    sharded = [v for _e, v in out.step_losses]
    print(
        f"{sharding}: max relative step-loss difference",
        max(abs(a - b) / abs(a) for a, b in zip(local, sharded, strict=True)),
    )
    assert len(sharded) == len(local) > 1
    np.testing.assert_allclose(sharded, local, rtol=REL_TOL)
    for key, value in ref.best_valid.items():
        assert out.result.best_valid[key] == pytest.approx(value, rel=1e-5)

    # a normal checkpoint: loads into a SeqRanker with the returned weights, not resumable
    saved = load_checkpoint(ckpt)
    assert saved["distributed"]["world_size"] == 2
    model = model_from_checkpoint(saved)
    for key, value in out.result.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)
    # scores, not weights: Adam turns the float noise of a zero gradient (the attention
    # key bias, which softmax ignores) into steps of size lr, invisible in the scores
    kjt = history_kjt(user_sequences(tiny_ds, np.arange(len(tiny_ds.interactions))), 6)
    with torch.inference_mode():
        torch.testing.assert_close(model(kjt), ref.model(kjt), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValidationError, match="no optimizer state"):
        train(cfg, tiny_ds, checkpoint_path=ckpt, resume=True, progress=False)


def test_unsupported_cpu_combinations_are_refused_before_spawning() -> None:
    with pytest.raises(ValidationError, match=r"PoolingMode\.NONE"):
        check_config(_cfg(), DistributedConfig(sharding="data_parallel"))
    with pytest.raises(ValidationError, match="no Adam"):
        check_config(tiny_train_config(), DistributedConfig(sharding="row_wise"))
    check_config(_cfg(), DistributedConfig(sharding="row_wise"))


def test_rank_slices_cover_the_global_batch_once() -> None:
    batch = [np.arange(n) for n in (3, 5, 2)]  # 2 + 4 + 1 = 7 targets
    parts = [_rank_batch(batch, r, 4, num_items=10, max_len=4) for r in range(4)]
    covered = [i for _kjt, _tg, where, n in parts for i in range(n)[where]]
    assert covered == list(range(7))
    assert all(n == 7 for *_rest, n in parts)
    empty = [p for p in parts if p[2].start == p[2].stop]  # 3 windows on 4 ranks
    assert len(empty) == 1
    kjt, targets, _where, _n = empty[0]  # one empty history, no targets
    assert (targets < 0).all()
    assert kjt.lengths().tolist() == [0, 10]  # + the all-items row


def test_cli_refuses_sharded_adamw_on_cpu_in_one_line(tmp_path, capsys) -> None:
    data = write_dataset(make_dataset(), tmp_path / "synthetic")
    rc = main(["train", "ranker", "--dataset", str(data), "--cache-dir", str(tmp_path / "c"),
               "--out", str(tmp_path / "r.pt"), "--world-size", "2", "--no-progress"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 2 and "--embedding-optimizer" in captured.err and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and not (tmp_path / "r.pt").exists()
