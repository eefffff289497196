"""vLLM process plumbing without vLLM: child environment, command line, shutdown."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llm_cloud.server import ServerConfig, live_group_members, stop_process_group
from llm_cloud.vllm_env import (
    LOGITS_PROCESSOR,
    VllmUnavailableError,
    check_head_dim,
    find_vllm_python,
    vllm_child_env,
)
from recsys.settings import PROJECT_ROOT


def test_child_env_has_the_fixed_variables_and_the_project_on_the_path() -> None:
    env = vllm_child_env({"PATH": "/bin", "VIRTUAL_ENV": "/x", "PYTHONPATH": "/a"}, kv_cache_gib=2)
    assert env["VLLM_HOST_IP"] == "127.0.0.1" and env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == env["VLLM_NO_USAGE_STATS"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep) == [str(PROJECT_ROOT), "/a"]
    assert "VIRTUAL_ENV" not in env and env["PATH"] == "/bin"


def test_missing_interpreter_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(VllmUnavailableError, match="does not exist"):
        find_vllm_python(tmp_path / "nope" / "python")


def test_server_command_registers_the_trie_processor(tmp_path: Path) -> None:
    cmd = ServerConfig(model_dir=tmp_path, port=0).command(Path("/py"), 8123)
    line = " ".join(cmd)
    assert cmd[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    assert f"--logits-processors {LOGITS_PROCESSOR}" in line
    assert "--logprobs-mode processed_logprobs" in line and "--host 127.0.0.1 --port 8123" in line
    assert "--block-size 32" in line


def test_head_dim_check(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, tiny_lm_dir: Path
) -> None:
    assert check_head_dim(tiny_lm_dir) == 32
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
    with caplog.at_level(logging.WARNING):
        assert check_head_dim(tmp_path) == 16
    assert "head_dim 16" in caplog.text


def test_stop_process_group_ends_the_child_and_its_children() -> None:
    """Like vLLM: a leader that exits on SIGTERM and a child (engine) that lingers."""
    grandchild = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    )
    leader = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {grandchild!r}])\n"
        "time.sleep(0.5); print('ready', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", leader], start_new_session=True, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    stop_process_group(proc, grace=2)
    assert proc.returncode is not None
    assert live_group_members(proc.pid) == []  # the lingering child was killed too
    stop_process_group(proc, grace=1)  # idempotent


@pytest.mark.parametrize(
    ("field", "value"), [("port", 70000), ("dtype", "float16"), ("startup_timeout", 0)]
)
def test_server_config_rejects_bad_values(tmp_path: Path, field: str, value: object) -> None:
    from recsys.errors import ValidationError

    with pytest.raises(ValidationError, match=f"ServerConfig: {field}"):
        ServerConfig(model_dir=tmp_path, **{field: value})
