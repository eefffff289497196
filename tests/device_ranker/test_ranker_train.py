"""Training: determinism, checkpoint contents, resume, arbitrary rows."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from ranker_helpers import tiny_train_config

from device_ranker.evaluate import evaluate, loo_eval_set
from device_ranker.ranker import Ranker
from device_ranker.train import load_checkpoint, make_windows, model_score_fn, train
from recsys.data import Dataset, leave_one_out, time_split
from recsys.errors import ValidationError


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_make_windows_uses_every_target_once() -> None:
    seq = np.arange(10)
    windows = make_windows([seq, np.arange(1)], max_len=4)
    targets = sorted(int(t) for w in windows for t in w[1:])
    assert targets == list(range(1, 10))
    assert all(2 <= len(w) <= 5 for w in windows)


def test_training_is_deterministic_with_a_seed(tiny_ds: Dataset) -> None:
    cfg = tiny_train_config(epochs=2)
    a = train(cfg, tiny_ds, progress=False)
    b = train(cfg, tiny_ds, progress=False)
    assert _same_weights(a.model, b.model)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    c = train(replace(cfg, seed=1), tiny_ds, progress=False)
    assert not _same_weights(a.model, c.model)


def test_checkpoint_and_resume_equal_an_uninterrupted_run(tiny_ds: Dataset, tmp_path: Path) -> None:
    cfg = tiny_train_config(epochs=4, patience=10)
    full = train(cfg, tiny_ds, progress=False)
    ckpt = tmp_path / "ranker.pt"
    first = train(replace(cfg, epochs=2), tiny_ds, checkpoint_path=ckpt, progress=False)
    assert len(first.history) == 2
    saved = load_checkpoint(ckpt)
    for key in (
        "model_config",
        "train_config",
        "dataset",
        "versions",
        "epoch",
        "optimizer_state",
        "model_state",
        "best_state",
        "item_ids",
    ):
        assert key in saved, key
    assert saved["epoch"] == 2 and saved["dataset"]["fingerprint"] == tiny_ds.fingerprint()
    assert saved["versions"]["torch"]
    resumed = train(cfg, tiny_ds, checkpoint_path=ckpt, resume=True, progress=False)
    assert len(resumed.history) == 4
    assert _same_weights(resumed.model, full.model)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    ranker = Ranker.from_checkpoint(ckpt)
    assert _same_weights(ranker.model, full.model)
    assert ranker.item_ids == list(tiny_ds.item_ids)


def test_resume_rejects_a_changed_config_or_missing_file(tiny_ds: Dataset, tmp_path: Path) -> None:
    ckpt = tmp_path / "ranker.pt"
    with pytest.raises(ValidationError, match="needs an existing checkpoint"):
        train(tiny_train_config(), tiny_ds, checkpoint_path=ckpt, resume=True, progress=False)
    train(tiny_train_config(epochs=1), tiny_ds, checkpoint_path=ckpt, progress=False)
    with pytest.raises(ValidationError, match="different training config"):
        train(tiny_train_config(lr=0.5), tiny_ds, checkpoint_path=ckpt, resume=True, progress=False)


def test_training_learns_and_trains_on_any_rows(tiny_ds: Dataset) -> None:
    split = leave_one_out(tiny_ds)
    res = train(tiny_train_config(epochs=10, patience=10, lr=1e-2), tiny_ds, progress=False)
    test = evaluate(model_score_fn(res.model), loo_eval_set(tiny_ds, split, "test"), ks=(1,))
    assert test["hr@1"] > 0.25  # the synthetic walks are predictable; random is 1/20
    assert res.best_valid["ndcg@10"] > 0
    period = time_split(tiny_ds, quantile=0.8, min_train_events=3)
    other = train(
        tiny_train_config(epochs=1, loss="bce"), tiny_ds, rows=period.train, progress=False
    )
    assert other.history and np.isfinite(other.history[0]["loss"])


def test_time_budget_stops_after_the_epoch_that_crosses_it(tiny_ds: Dataset) -> None:
    budget = train(
        tiny_train_config(epochs=5, patience=10, max_minutes=1e-9), tiny_ds, progress=False
    )
    assert len(budget.history) == 1  # min_epochs = 1, then the budget is spent
    full = train(tiny_train_config(epochs=5, patience=10), tiny_ds, progress=False)
    assert len(full.history) == 5
    with pytest.raises(ValidationError, match="max_minutes"):
        tiny_train_config(max_minutes=0)
