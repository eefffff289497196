"""`recsys train lm` and `recsys bench llm` end to end on a tiny canonical dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from llm_helpers import synthetic_sequences

from recsys.cli import build_parser, main
from recsys.data.canonical import Dataset, write_dataset


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(dataset dir, codebook dir, cache dir): 30 items, 20 users, an RQ-k-means codebook."""
    from codebook.train import CodebookConfig, train_codebook

    root = tmp_path_factory.mktemp("cli")
    num_items = 30
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(num_items)]})
    rows = []
    for u, seq in enumerate(synthetic_sequences(num_items, users=20, length=12, seed=5)):
        rows += [(f"u{u}", f"i{int(item)}", 1000 * u + t) for t, item in enumerate(seq)]
    ds = Dataset("toy", items, pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]),
                 info={"text_columns": []})  # fmt: skip
    ds_dir = write_dataset(ds, root / "toy")
    vectors = np.random.default_rng(0).normal(size=(num_items, 8)).astype(np.float32)
    cb = train_codebook(vectors, CodebookConfig(method="rqkmeans", levels=2, codes=4),
                        item_ids=ds.item_ids, info={"dataset": "toy", "fingerprint": ds.fingerprint()})  # fmt: skip
    cb_dir = cb.save(root / "codebook")
    return ds_dir, cb_dir, root / "cache"


TINY = ["--hidden", "64", "--layers", "1", "--heads", "2", "--head-dim", "32", "--intermediate", "64",
        "--max-history", "6", "--stride", "3", "--epochs", "2", "--batch-size", "16", "--no-progress",
        "--threads", "1", "--no-bf16"]  # fmt: skip


def test_train_then_bench(
    setup: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ds_dir, cb_dir, cache = setup
    model = tmp_path / "lm"
    code = main(["train", "lm", "--dataset", str(ds_dir), "--codebook", str(cb_dir), "--split", "loo",
                 "--out", str(model), "--cache-dir", str(cache), "--json", str(tmp_path / "t.json"), *TINY])  # fmt: skip
    assert code == 0
    trained = json.loads((tmp_path / "t.json").read_text())
    assert trained["split"]["split"] == "loo" and len(trained["history"]) == 2
    assert (model / "model.safetensors").is_file() and (model / "recsys_lm.json").is_file()
    out = tmp_path / "bench.json"
    code = main(["bench", "llm", "--dataset", str(ds_dir), "--model", str(model), "--backends",
                 "transformers,transformers-hf", "--beam", "10", "--throughput-users", "8",
                 "--batch-users", "4", "--latency-users", "2", "--cache-dir", str(cache), "--json", str(out)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "most-popular (ours)" in printed and "TIGER (published)" in printed
    figures = json.loads(out.read_text())
    quality = figures["quality"]
    assert 0.0 <= quality["codebook_lm"]["recall@10"] <= 1.0
    assert quality["codebook_lm"]["recall@5"] <= quality["codebook_lm"]["recall@10"]
    assert (
        quality["test_users"] == 20
        and quality["tiger_published_amazon_beauty"]["recall@10"] == 0.0648
    )
    for name in ("transformers", "transformers-hf"):
        assert figures["throughput"][name]["batched"]["users_per_s"] > 0
    assert figures["throughput"]["transformers"]["top1_agreement_with_transformers"] == 1.0
    assert figures["versions"]["torch"]


def test_codebook_of_other_data_is_refused(setup: tuple[Path, Path, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    ds_dir, _, cache = setup
    from codebook.train import CodebookConfig, train_codebook

    vectors = np.random.default_rng(1).normal(size=(30, 8)).astype(np.float32)
    other = train_codebook(vectors, CodebookConfig(method="rqkmeans", levels=2, codes=4),
                           info={"fingerprint": "0123456789abcdef"}).save(tmp_path / "cb")  # fmt: skip
    code = main(["train", "lm", "--dataset", str(ds_dir), "--codebook", str(other), "--out",
                 str(tmp_path / "lm"), "--cache-dir", str(cache), *TINY])  # fmt: skip
    assert code == 2 and "another version" in capsys.readouterr().err


def test_help_lists_every_option() -> None:
    parser = build_parser()
    for argv in (["train", "lm", "--help"], ["serve", "llm", "--help"], ["bench", "llm", "--help"]):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(argv)
        assert exc.value.code == 0


def test_bench_rejects_unknown_backends(
    setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ds_dir, _, cache = setup
    assert (
        main(
            [
                "bench",
                "llm",
                "--dataset",
                str(ds_dir),
                "--backends",
                "tgi",
                "--cache-dir",
                str(cache),
            ]
        )
        == 2
    )
    assert "unknown backend" in capsys.readouterr().err


def test_serve_llm_passes_extra_vllm_arguments(tmp_path: Path) -> None:
    """`--vllm-arg` (repeatable) reaches vLLM's command line after the project's own flags,
    e.g. tensor parallelism on a multi-GPU machine."""
    from recsys.cli.llm_serve_cmd import server_config

    args = build_parser().parse_args(
        ["serve", "llm", "--model", str(tmp_path), "--vllm-arg=--tensor-parallel-size=2",
         "--vllm-arg=--distributed-executor-backend=ray"]
    )  # fmt: skip
    cmd = server_config(args, tmp_path, 128).command(Path("python"), 8000)
    assert cmd[-2:] == ["--tensor-parallel-size=2", "--distributed-executor-backend=ray"]
    assert cmd[cmd.index("--max-model-len") + 1] == "128"
