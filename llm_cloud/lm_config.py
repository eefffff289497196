"""Settings of the codebook LM's training (:func:`llm_cloud.lm_train.train_lm`) and what
it returns.

:class:`LMConfig` is a validated, frozen config: a value out of range fails at
construction with :class:`recsys.errors.ValidationError` naming the field (see
:mod:`recsys.validation`). Change one with ``dataclasses.replace(cfg, epochs=5)``.

Example::

    cfg = LMConfig(epochs=2, threads=1)
    LMConfig(head_dim=16)   # ValidationError: head_dim 16 is not supported by vLLM's CPU ...
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import Field

from llm_cloud.prompts import ItemVocab
from llm_cloud.vllm_env import VLLM_CPU_HEAD_DIMS
from recsys.validation import config_dataclass


@config_dataclass
class LMConfig:
    """Model, data and optimisation settings of :func:`llm_cloud.lm_train.train_lm`.

    Attributes (model; ignored with ``base_model``):
        hidden_size: residual width.
        num_layers: transformer blocks.
        num_heads: attention heads (key/value heads too).
        head_dim: per-head width; must be one vLLM-CPU supports
            (:data:`llm_cloud.vllm_env.VLLM_CPU_HEAD_DIMS`; 16 starts, then crashes).
        intermediate_size: SwiGLU width.
        max_position_embeddings: longest sequence (tokens) the model and vLLM accept.
        attention_dropout: dropout on attention weights (Llama has no other dropout).
        tie_embeddings: share input and output embeddings (fewer parameters; small data).

    Attributes (data, see :mod:`llm_cloud.lm_data`):
        max_history: items of history per window / prompt.
        stride: items between the ends of consecutive windows of one user.
        history_loss_weight: weight of the history-ID tokens' loss (answer tokens: 1).

    Attributes (optimisation):
        epochs: maximum passes over the windows.
        batch_size: windows per step.
        lr: peak AdamW learning rate.
        weight_decay: AdamW decoupled weight decay (not on norms/biases).
        warmup_steps: linear warm-up steps.
        grad_clip: max global gradient norm.
        patience: epochs without validation improvement before stopping.
        min_delta: improvement (nats per item) that counts.
        max_minutes: stop after this much wall time (None: no limit).
        eval_beams: beam width of the final validation Recall@10 (0: skip it).
        eval_users: at most this many validation users in that evaluation.
        bf16: bfloat16 autocast for forward/backward (fp32 master weights; ~2x faster
            on CPUs with AMX/AVX-512-BF16, and on GPUs, ~10x slower on other CPUs);
            None (default): where it is fast (:func:`llm_cloud.hardware.fast_bf16`).
        seed: seeds initialisation, data order and window shifts.
        threads: torch intra-op threads (None: leave the process setting).
        device: "cpu" (here) or "cuda".
        base_model: None (train from scratch) or a HF causal-LM directory to extend
            with the codebook tokens and fine-tune (GPU path, see :mod:`llm_cloud.lm_train`).
    """

    hidden_size: int = Field(128, ge=1)
    num_layers: int = Field(2, ge=1)  # 4 layers overfit ml-100k sooner without a better optimum
    num_heads: int = Field(4, ge=1)
    head_dim: int = Field(32, ge=1)  # vLLM CPU attention: 32/64/80/...; 16 crashes the engine
    intermediate_size: int = Field(256, ge=1)  # 2x hidden
    max_position_embeddings: int = Field(512, ge=8)  # prompt (3 + 20 * 4) + answer (5) fits
    attention_dropout: float = Field(0.1, ge=0, lt=1)
    tie_embeddings: bool = True
    max_history: int = Field(20, ge=1)  # ml-100k users average ~100 events; recent ones count
    stride: int = Field(20, ge=1)  # ~1 window per item per epoch; shifts vary the cuts
    history_loss_weight: float = Field(1.0, ge=0)
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    patience: int = Field(2, ge=1)
    min_delta: float = Field(0.005, ge=0)
    max_minutes: float | None = Field(None, gt=0)
    eval_beams: int = Field(20, ge=0)
    eval_users: int = Field(2000, ge=1)
    bf16: bool | None = None
    seed: int = 0
    threads: int | None = Field(None, ge=1)
    device: str = Field("cpu", min_length=1)
    base_model: str | None = None

    def __post_init__(self) -> None:
        if self.base_model is None and self.head_dim not in VLLM_CPU_HEAD_DIMS:
            raise ValueError(
                f"head_dim {self.head_dim} is not supported by vLLM's CPU attention; "
                f"use one of {VLLM_CPU_HEAD_DIMS}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LMResult:
    """What :func:`llm_cloud.lm_train.train_lm` returns.

    Attributes:
        model: the trained model (best validation epoch), eval mode, on the CPU.
        tokenizer: its tokenizer.
        vocab: token-id mapping used for the data.
        config: the settings used.
        history: one dict per epoch (train_loss, valid_nll, seconds).
        best_epoch: 1-based epoch whose weights were kept.
        valid_metrics: recall@10 / ndcg@10 of beam search on validation users (if run).
        seconds: total wall time.
        num_parameters: trainable parameters.
        num_windows: training windows per epoch.
    """

    model: Any
    tokenizer: Any
    vocab: ItemVocab
    config: LMConfig
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    valid_metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    num_parameters: int = 0
    num_windows: int = 0


__all__ = ["LMConfig", "LMResult"]
