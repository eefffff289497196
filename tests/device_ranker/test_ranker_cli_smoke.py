"""CLI round trip on a tiny canonical dataset, and a small ml-100k smoke test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from ranker_helpers import make_dataset, tiny_train_config

from device_ranker.evaluate import evaluate, evaluate_popularity, loo_eval_set
from device_ranker.train import model_score_fn, train
from recsys.cli import main
from recsys.data import leave_one_out, write_dataset


def test_cli_train_and_bench_ranker(tmp_path: Path, capsys) -> None:
    data = write_dataset(make_dataset(), tmp_path / "synthetic")
    ckpt = tmp_path / "ranker.pt"
    common = [
        "--dataset",
        str(data),
        "--checkpoint",
        str(ckpt),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--epochs",
        "2",
        "--dim",
        "8",
        "--max-len",
        "5",
        "--no-progress",
    ]
    assert main(["train", "ranker", *common]) == 0
    assert ckpt.is_file()
    out_json = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "ranker",
                *common,
                "--latency-users",
                "5",
                "--finetune-users",
                "2",
                "--batch-size",
                "8",
                "--json",
                str(out_json),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert (
        "excluded" in printed
        and "DeviceRanker (ours)" in printed
        and "BPR (RecBole 1.2.1)" in printed
    )
    figures = json.loads(out_json.read_text())
    for key in (
        "ndcg@10",
        "hr@10",
        "mrr@10",
        "hr@20",
        "ndcg@20",
        "latency_p50_ms",
        "latency_p99_ms",
        "users_per_s",
        "edit_apply_us",
        "finetune_ms_per_user",
        "config",
        "dataset",
        "seed",
        "versions",
    ):
        assert key in figures, key
    assert figures["edit_revert_exact"] is True


def test_ml100k_smoke(ml100k) -> None:
    split = leave_one_out(ml100k)
    users = ml100k.user_index
    rows = split.train[users[split.train] < 150]  # a slice of users keeps this fast
    res = train(
        tiny_train_config(epochs=1, model=tiny_train_config().model),
        ml100k,
        rows=rows,
        progress=False,
    )
    test = loo_eval_set(ml100k, split, "test")
    ours = evaluate(model_score_fn(res.model), test)
    pop = evaluate_popularity(ml100k, split.train, test)
    assert ours["users"] == pop["users"] == ml100k.num_users
    assert 0.0 <= ours["ndcg@10"] <= 1.0 and np.isfinite(ours["mrr@10"])
    assert 0.03 < pop["hr@10"] < 0.15  # RecBole's Pop: 0.0710
