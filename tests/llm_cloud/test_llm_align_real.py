"""The real pretrained LLM end to end: SmolLM2-135M imported from its wheel, aligned
with a codebook for one step (a tiny budget), saved, and served by the transformers
backend and the real vLLM engine with the trie constraint: every ID is valid.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from llm_helpers import skip_module_without_vllm, synthetic_sequences
from test_llm_align import item_texts_for

from codebook.semantic_ids import SemanticIdMap
from llm_cloud.align import AlignConfig, align_lm
from llm_cloud.artifact import load_item_vocab, save_lm
from llm_cloud.backends import BackendConfig, make_backend

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def aligned_dir(
    smollm2_dir: Path, ids: SemanticIdMap, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    seqs = synthetic_sequences(ids.num_items, users=6, length=8)
    pairs = [(s[:-1], int(s[-1])) for s in seqs[:2]]
    cfg = AlignConfig(
        max_history=6, text_items=2, text_tokens=6, batch_size=2, max_minutes=1e-6,
        eval_users=2, eval_beams=0, threads=1,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("aligned") / "smollm2"
    result = align_lm(smollm2_dir, seqs, pairs, ids, item_texts_for(ids), cfg, out_dir=out)
    assert result.valid_metrics["stopped_by"] == "budget" and result.valid_metrics["steps"] == 1
    assert sum(p.numel() for p in result.model.parameters()) > 130_000_000  # the real model
    # trained: top 4 blocks + output head + the codebook's input rows (not the whole table)
    assert 0 < result.num_parameters < 60_000_000
    yield save_lm(result, out, info={"dataset": "synthetic"})


HISTORIES = [[0, 1, 2], [], list(range(40)), [7] * 30, [39, 38]]


def _valid(ranked: list[list[tuple[int, float]]], num_items: int, top_n: int) -> None:
    for row in ranked:
        items = [i for i, _ in row]
        assert len(items) == top_n and len(set(items)) == top_n
        assert all(0 <= i < num_items for i in items)


def test_transformers_backend_serves_only_valid_ids(aligned_dir: Path, ids: SemanticIdMap) -> None:
    vocab, meta = load_item_vocab(aligned_dir)
    assert meta["prompt"]["text_items"] == 2 and vocab.has_text
    backend = make_backend("transformers", aligned_dir, BackendConfig(beam_width=8))
    _valid(backend.generate(HISTORIES, 5), ids.num_items, 5)
    backend.close()


@pytest.mark.vllm
def test_vllm_engine_serves_only_valid_ids(aligned_dir: Path, ids: SemanticIdMap) -> None:
    skip_module_without_vllm()
    config = BackendConfig(beam_width=8, batch_users=8)
    engine = make_backend("vllm", aligned_dir, config, dtype="float32")
    try:
        got = engine.generate(HISTORIES, 5)
    finally:
        engine.close()
    _valid(got, ids.num_items, 5)
    reference = make_backend("transformers", aligned_dir, config).generate(HISTORIES, 5)
    # same model, same trie, same renormalised scores: the top item agrees
    agree = sum(a[0][0] == b[0][0] for a, b in zip(got, reference, strict=True))
    assert agree >= len(HISTORIES) - 1
