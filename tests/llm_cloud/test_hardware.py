"""bfloat16 only where it is fast (llm_cloud.hardware) and the transformers backend's
"auto" dtype that follows it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llm_cloud import hardware
from llm_cloud.backends import hf


def test_resolve_bf16_follows_the_hardware_unless_asked(monkeypatch) -> None:
    assert hardware.fast_bf16("cuda:1") is True
    assert hardware.resolve_bf16(True) is True and hardware.resolve_bf16(False) is False
    probe = hardware.fast_bf16("cpu")
    expected = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert probe == expected
    assert hardware.resolve_bf16(None, "cpu") == expected


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=8)  # fmt: skip
    out = tmp_path_factory.mktemp("bf16-model")
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    return out


@pytest.mark.parametrize("fast, want", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_serves_bf16_weights_in_bf16_only_where_fast(
    bf16_model: Path, monkeypatch, fast: bool, want: torch.dtype
) -> None:
    monkeypatch.setattr(hardware, "fast_bf16", lambda device="cpu": fast)
    assert hf._saved_dtype(bf16_model) == "bfloat16"
    model = hf.load_causal_lm(bf16_model, "auto")
    assert next(model.parameters()).dtype == want
    assert next(hf.load_causal_lm(bf16_model, "float32").parameters()).dtype == torch.float32


def test_auto_dtype_keeps_float32_weights(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=8)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    assert next(hf.load_causal_lm(tmp_path).parameters()).dtype == torch.float32
    assert hf._saved_dtype(tmp_path / "missing") is None
