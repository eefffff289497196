"""The `vllm` backend for real: a vllm.LLM engine in a worker process of .venv-vllm.

One engine for the module (float32, a tiny model trained here on ml-100k, 1,682 item
IDs); for real users' histories its results must equal the transformers backend's
(top-1 items and scores). Skips when .venv-vllm or the raw ml-100k files are missing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from llm_helpers import skip_module_without_vllm

from llm_cloud.backends import BackendConfig, make_backend
from llm_cloud.backends.base import Backend

pytestmark = pytest.mark.vllm

skip_module_without_vllm()


@pytest.fixture(scope="module")
def engine(trained_dir: Path) -> Iterator[Backend]:
    backend = make_backend(
        "vllm", trained_dir, BackendConfig(beam_width=8, batch_users=16), dtype="float32"
    )
    yield backend
    backend.close()


def test_worker_equals_transformers(
    engine: Backend, trained: tuple[Path, list[list[int]]], trained_dir: Path
) -> None:
    reference = make_backend(
        "transformers", trained_dir, BackendConfig(beam_width=8, batch_users=16)
    )
    histories = [*trained[1][:64], []]
    num_items = reference.vocab.num_items
    got, want = engine.generate(histories, 5), reference.generate(histories, 5)
    agree = 0
    for ours, theirs in zip(got, want, strict=True):
        assert len(ours) == 5 and all(0 <= i < num_items for i, _ in ours)
        assert ours[0][1] == pytest.approx(theirs[0][1], abs=1e-3)
        agree += ours[0][0] == theirs[0][0]
    assert agree >= 0.9 * len(histories)
    assert engine.info()["vllm"]


def test_worker_exclusion_and_close(engine: Backend, trained_dir: Path) -> None:
    history = [3, 4, 5]
    plain = engine.config
    engine.config = dataclasses.replace(plain, exclude_history=True)
    try:
        assert not {i for i, _ in engine.generate([history], 8)[0]} & set(history)
    finally:
        engine.config = plain
    proc = engine.proc
    engine.close()
    assert proc is not None and proc.poll() is not None
    engine.close()  # idempotent
