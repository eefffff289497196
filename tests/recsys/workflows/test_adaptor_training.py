"""The adaptor workflow on a tiny synthetic task: training lowers the next-window loss,
the training-time edited head equals the device's, adapting a device is a forward pass in
the cloud and a tensor addition on the device, and the CLI commands run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from adaptor_helpers import save_ids, tiny_dataset, tiny_ids, tiny_ranker_config

from codebook.adaptor import unbatch
from device_ranker.edits import HeadEdit
from device_ranker.ranker import Ranker
from recsys.cli import main
from recsys.data import time_split, user_sequences, write_dataset
from recsys.data.registry import load_dataset
from recsys.edit_payload import decode_payload, encode_payload
from recsys.workflows.adaptor_data import (
    FrozenRanker,
    WindowConfig,
    build_windows,
    device_bounds,
    ensure_time_ranker,
    generator_inputs,
    head_bounds,
    resolve_token_source,
    sample_windows,
    window_loss,
)
from recsys.workflows.adaptor_training import (
    AdaptorTrainConfig,
    LoopConfig,
    make_generators,
    train_generator,
)

WCFG = WindowConfig(window=3, stride=2, min_history=3, input_items=5, summary_items=4)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    """(dataset, frozen ranker, checkpoint path, ids, windows, bounds), built once."""
    torch.set_num_threads(1)
    ds = tiny_dataset()
    path = tmp_path_factory.mktemp("ranker") / "ranker-time.pt"
    ensure_time_ranker(ds, 0.8, path, ranker_cfg=tiny_ranker_config(epochs=1), progress=False)
    frozen = FrozenRanker.from_ranker(Ranker.from_checkpoint(path))
    ids = tiny_ids()
    split = time_split(ds, quantile=0.8)
    data = build_windows(
        frozen,
        user_sequences(ds, split.train),
        WCFG,
        resolve_token_source("recent", ids, 5, None),
        progress=False,
    )
    # generous bounds: the tiny head's last layer starts near zero (norm ~0.1)
    bounds = head_bounds(frozen, 20.0, 4.0, 0.95)
    return ds, frozen, path, ids, data, bounds


def small_config(**loop) -> AdaptorTrainConfig:
    base = dict(epochs=8, batch_size=16, lr=3e-3, patience=8, holdout_users=0.25, seed=0)
    base.update(loop)
    return AdaptorTrainConfig(
        windows=WCFG,
        loop=LoopConfig(**base),
        rank=2,
        token_dim=8,
        code_dim=8,
        hidden=16,
        dropout=0.0,
    )


def test_time_ranker_is_reused_when_the_split_matches(world) -> None:
    ds, _, path, *_ = world
    stamp = path.stat().st_mtime_ns
    assert ensure_time_ranker(ds, 0.8, path, ranker_cfg=tiny_ranker_config(1)) == path
    assert path.stat().st_mtime_ns == stamp  # not retrained
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["train_rows"] == len(time_split(ds, quantile=0.8).train)


def test_windows_hold_next_window_targets_and_states(world) -> None:
    _, frozen, _, ids, data, _ = world
    assert data.codes.shape == (len(data), 5, ids.num_levels) and data.token_source == "recent"
    k = 7
    seq = data.sequences[data.users[k]]
    b = data.bounds[k]
    n = min(3, len(seq) - b)
    assert np.array_equal(data.targets[k, :n], seq[b : b + n])
    assert np.array_equal(data.recent[k, :3], seq[:b][::-1][:3])  # most recent first
    state = frozen.ranker.user_states([seq[:b]])  # the state before the first target
    assert torch.allclose(data.states[data.state_rows[k, 0]], state[0], atol=1e-5)


def test_window_sample_is_seeded_sorted_and_a_subset_of_the_full_build(world) -> None:
    ds, frozen, _, ids, data, _ = world
    keep = sample_windows(100, 10, seed=3)
    assert len(keep) == 10 and np.all(np.diff(keep) > 0)
    assert np.array_equal(keep, sample_windows(100, 10, seed=3))
    assert not np.array_equal(keep, sample_windows(100, 10, seed=4))
    assert np.array_equal(sample_windows(5, None, 0), np.arange(5))
    assert np.array_equal(sample_windows(5, 9, 0), np.arange(5))

    wcfg = WindowConfig(
        window=3, stride=2, min_history=3, input_items=5, summary_items=4, max_windows=12
    )
    seqs = user_sequences(ds, time_split(ds, quantile=0.8).train)
    sub = build_windows(frozen, seqs, wcfg, resolve_token_source("recent", ids, 5, None),
                        progress=False)  # fmt: skip
    keep = sample_windows(len(data), 12, 0)
    assert len(sub) == 12
    assert np.array_equal(sub.users, data.users[keep]) and np.array_equal(
        sub.bounds, data.bounds[keep]
    )
    assert np.array_equal(sub.targets, data.targets[keep])
    assert np.array_equal(sub.codes, data.codes[keep]) and np.allclose(
        sub.summary, data.summary[keep]
    )


def test_lowrank_training_head_equals_the_device_head(world) -> None:
    _, frozen, path, ids, data, bounds = world
    adaptor, _ = make_generators(small_config(), frozen, ids, bounds, int(data.summary.shape[1]))
    with torch.no_grad():
        for lin in adaptor.decoder.out:
            lin.weight.normal_(0, 0.3)
        edit = adaptor(*generator_inputs("adaptor", data, np.arange(3)))
    ranker = Ranker.from_checkpoint(path, bounds=device_bounds(bounds, 2))
    x = torch.randn(3, 1, frozen.item_table.shape[1])
    ours = frozen.queries(x, edit.tensors)[:, 0]  # [3, D]
    for b in range(3):
        prepared = ranker.prepare(HeadEdit.from_flat(unbatch(edit.tensors, b)))
        device = ranker.model.head(x[b], prepared.weights)
        assert torch.allclose(ours[b], device[0], atol=1e-5)


def test_training_reduces_next_window_loss(world) -> None:
    _, frozen, _, ids, data, bounds = world
    cfg = small_config()
    adaptor, duet = make_generators(cfg, frozen, ids, bounds, int(data.summary.shape[1]))
    res = train_generator("adaptor", adaptor, frozen, data, cfg.loop, progress=False)
    hist = res.history
    assert hist[0]["epoch"] == 0 and hist[0]["holdout_loss"] == pytest.approx(
        res.base_holdout["loss"], abs=1e-5
    )  # the untrained generator's edit is the identity
    assert hist[-1]["train_loss"] < hist[1]["train_loss"] - 0.05
    best = hist[res.best_epoch]["holdout_loss"]
    assert res.best_epoch >= 1 and best < res.base_holdout["loss"] - 0.02
    # the kept weights are the best epoch's
    idx = np.arange(len(data))
    with torch.no_grad():
        full, _ = window_loss(
            frozen, data, idx, adaptor(*generator_inputs("adaptor", data, idx)), True
        )
        base, _ = window_loss(frozen, data, idx, None, True)
    assert float(full) < float(base)
    # the DUET-style baseline trains with the same loop
    res_d = train_generator("duet", duet, frozen, data, small_config(epochs=3).loop, progress=False)
    assert (
        len(res_d.history) == 4 and res_d.history[-1]["train_loss"] < res_d.history[1]["train_loss"]
    )
    # a wall-time budget stops after the epoch that crosses it
    quick = small_config(epochs=3, max_minutes=1e-9).loop
    assert len(train_generator("duet", duet, frozen, data, quick, progress=False).history) == 2


def test_adapting_a_device_is_a_forward_pass_and_an_addition(world, monkeypatch) -> None:
    _, frozen, path, ids, data, bounds = world
    adaptor, _ = make_generators(small_config(), frozen, ids, bounds, int(data.summary.shape[1]))
    with torch.no_grad():
        for lin in adaptor.decoder.out:
            lin.weight.normal_(0, 0.3)
    # cloud: ONE forward pass, no gradient anywhere
    with torch.no_grad():
        gen = adaptor(*generator_inputs("adaptor", data, np.arange(1)))
    assert all(t.grad_fn is None and not t.requires_grad for t in gen.tensors.values())
    assert all(p.grad is None for p in adaptor.parameters())
    data_bytes = encode_payload(unbatch(gen.tensors, 0), dtype="fp16")

    # device: decode, validate, add. Autograd is off and back-propagation impossible.
    ranker = Ranker.from_checkpoint(path, bounds=device_bounds(bounds, 2))
    grad_flags: list[bool] = []
    real_addmm = torch.addmm

    def spy_addmm(*args, **kwargs):
        grad_flags.append(torch.is_grad_enabled())
        return real_addmm(*args, **kwargs)

    def no_backward(*args, **kwargs):
        raise AssertionError("the device must never back-propagate")

    monkeypatch.setattr(torch, "addmm", spy_addmm)
    monkeypatch.setattr(torch.autograd, "backward", no_backward)
    monkeypatch.setattr(torch.Tensor, "backward", no_backward)
    history = data.sequences[0][:6]
    state_before = {k: v.clone() for k, v in ranker.model.state_dict().items()}
    scores_before = ranker.scores([history], edit="base")
    payload = decode_payload(data_bytes, spec=ranker.edit_spec(), max_rank=2)
    edit = HeadEdit.from_flat(payload.tensors)
    prepared = ranker.apply_edit(edit)  # kept factored; read densely below
    for (name, le), (w, b), (w0, b0) in zip(
        edit.layers.items(), prepared.weights, ranker.model.head.base_weights(), strict=True
    ):
        assert w.grad_fn is None and not w.requires_grad, name
        dw = (le.u * le.s) @ le.v.T
        assert torch.allclose(w, w0 + dw, atol=1e-6) and torch.allclose(b, b0 + le.bias)
    assert grad_flags and not any(grad_flags)  # W + U diag(s) V^T was formed without autograd
    edited = ranker.scores([history])
    assert edited.grad_fn is None and not torch.equal(edited, scores_before)
    ranker.revert_edit()
    assert torch.equal(ranker.scores([history]), scores_before)  # bit-identical
    for k, v in ranker.model.state_dict().items():
        assert torch.equal(v, state_before[k]), k  # base weights never written


def test_cli_train_adaptor(tmp_path: Path, capsys) -> None:
    root = write_dataset(tiny_dataset(), tmp_path / "tiny")
    cache = tmp_path / "cache"
    ds = load_dataset(root)
    save_ids(tiny_ids(), cache, ds.name)
    ensure_time_ranker(
        ds,
        0.8,
        cache / "artifacts" / ds.name / "ranker-time.pt",
        ranker_cfg=tiny_ranker_config(2),
        progress=False,
    )
    common = ["--dataset", str(root), "--cache-dir", str(cache), "--no-progress"]
    rc = main(
        [
            "train",
            "adaptor",
            *common,
            "--epochs",
            "2",
            "--window",
            "3",
            "--prototypes",
            "3",
            "--rank",
            "2",
            "--json",
            str(tmp_path / "train.json"),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "Next-window loss" in out and "prototype + rank-2 residual" in out
    trained = json.loads((tmp_path / "train.json").read_text())
    assert trained["token_source"] == "recent" and trained["prototypes"]["prototypes"] == 3
    assert (cache / "artifacts" / ds.name / "adaptor" / "adaptor.pt").is_file()
    # the evaluation of this artefact: tests/recsys/replay/test_adaptor_eval.py


def test_cli_errors_are_clean(tmp_path: Path, capsys) -> None:
    root = write_dataset(tiny_dataset(), tmp_path / "tiny")
    rc = main(["eval", "adaptor", "--dataset", str(root), "--cache-dir", str(tmp_path / "c")])
    assert rc == 2 and "recsys train adaptor" in capsys.readouterr().err


def test_token_sources(tmp_path: Path, monkeypatch) -> None:
    import llm_cloud.backends as backends
    from recsys.adaptor_inputs import LMTokens

    ids = tiny_ids()
    recent = resolve_token_source("auto", ids, 4, tmp_path / "no-lm")
    assert recent.name == "recent"
    codes, scores = recent([np.array([3, 9, 4])])
    assert scores is None and codes.shape == (1, 4, ids.num_levels)
    assert np.array_equal(codes[0, 0], ids.codes[4]) and (codes[0, 3] == -1).all()

    class FakeBackend:  # the llm_cloud interface: generate(histories, top_n) -> [(item, score)]
        def generate(self, histories, top_n):
            return [[(7, -0.5), (2, -1.5)] for _ in histories]

        def close(self):
            pass

    monkeypatch.setattr(backends, "make_backend", lambda *a, **k: FakeBackend())
    lm_dir = tmp_path / "lm"
    lm_dir.mkdir()
    (lm_dir / "recsys_lm.json").write_text("{}")
    lm = resolve_token_source("auto", ids, 3, lm_dir)
    assert isinstance(lm.source.source, LMTokens)  # behind the token cache
    codes, scores = lm([np.array([1, 2]), np.array([5])])
    assert np.array_equal(codes[:, 0], ids.codes[[7, 7]]) and (codes[:, 2] == -1).all()
    assert np.allclose(scores[0, :2], [-0.5, -1.5])
    with pytest.raises(Exception, match="recsys train lm"):
        resolve_token_source("lm", ids, 3, tmp_path / "no-lm")
