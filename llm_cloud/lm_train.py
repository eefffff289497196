"""Train the codebook LM: a small Llama over semantic-ID tokens, from scratch, on the CPU.

Shapes: B batch of windows, T tokens per window, V vocabulary, D = L+1 tokens per
semantic ID.

**Data** (:mod:`llm_cloud.lm_data`): each user's history cut into windows written like a
serving prompt plus its answer, ``<bos> <user> ID(h_1) ... ID(h_H) <sep> ID(t) <eos>``;
the loss is causal LM cross-entropy on every ID token (the answer weight 1, the history
IDs ``history_loss_weight``), so one window trains H+1 next-item predictions: every
next-item position of the data is trained for about the data's own token count, which
is what makes minutes of CPU enough.

**Model.** ``LlamaForCausalLM`` (RMSNorm, RoPE, SwiGLU), default 2 layers of width 128,
4 heads of ``head_dim`` 32 (354k parameters on ml-100k): vLLM's CPU attention only
supports head_dim in {32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512} (16 crashes at
the first generate), so the head dim is set explicitly rather than derived from
width/heads. Embeddings are tied. Settings: :class:`llm_cloud.lm_config.LMConfig`.

**Training.** AdamW, linear warm-up then cosine decay, gradient clipping, seeded data
order and initialisation; after every epoch the validation loss (NLL of the held-out
next item's D tokens after ``<sep>``, nats per item) decides early stopping, and the
best epoch's weights are kept. At the end the validation Recall@10 of constrained beam
search is measured (:func:`llm_cloud.backends.hf.levelwise_beam_search`).

**Output** (:func:`llm_cloud.artifact.save_lm`): ``save_pretrained`` of model
(safetensors), generation config and tokenizer, so ``vllm`` serves the directory
unchanged, plus the semantic IDs and ``recsys_lm.json``.

**A pretrained LLM instead (LC-Rec style).** The full path, with item text in the
prompts, text <-> ID alignment tasks, embeddings initialised from item text, a CPU
budget and resumable checkpoints, is :mod:`llm_cloud.align` (``recsys train llm``). The
plain variant here sets ``base_model`` to a Hugging Face causal-LM directory and trains
on ID-only windows (e.g. a larger model with ``device="cuda"``); :func:`prepare_base_model`
(shared with :mod:`llm_cloud.align`) then::

    tok = AutoTokenizer.from_pretrained(base)
    tok.add_tokens(ids.vocabulary())                         # one new token per code
    tok.add_tokens(["<user>", "<sep>"], special_tokens=True)
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(len(tok), mean_resizing=True)   # new rows ~ mean embedding

and the same windows (token ids looked up in that tokenizer, the model's own BOS/EOS)
fine-tune every weight with the same loss; use a smaller ``lr`` (e.g. 1e-4) and
``batch_size``. The saved directory works with every backend: they look item tokens up
by string in the tokenizer and never assume their positions. (For LoRA, merge the
adapter before saving; vLLM then serves the merged directory.)

The config, the data functions and :func:`save_lm` are importable from here too.

Example::

    result = train_lm(train_seqs, valid_pairs, ids, LMConfig(epochs=2))
    save_lm(result, "artifacts/ml-100k/lm", info={"dataset": "ml-100k"})
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llm_cloud.artifact import save_lm
from llm_cloud.lm_config import LMConfig, LMResult
from llm_cloud.lm_data import (
    SPLITS,
    build_windows,
    collate,
    dataset_sequences,
    encode_window,
    window_ends,
)
from llm_cloud.prompts import ItemVocab
from recsys.errors import ValidationError

if TYPE_CHECKING:
    from codebook.semantic_ids import SemanticIdMap

logger = logging.getLogger(__name__)


# ---- model ---------------------------------------------------------------------------------
def new_llama(config: LMConfig, tokenizer: Any) -> Any:
    """A freshly initialised ``LlamaForCausalLM`` for ``tokenizer`` (call after seeding)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    sp = tokenizer
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        attention_dropout=config.attention_dropout,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=sp.bos_token_id,
        eos_token_id=sp.eos_token_id,
        pad_token_id=sp.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        bos_token_id=sp.bos_token_id,
        eos_token_id=sp.eos_token_id,
        pad_token_id=sp.pad_token_id,
        max_new_tokens=8,  # one semantic ID + <eos>
    )
    return model


def prepare_base_model(base_model: str, ids: SemanticIdMap, device: str = "cpu") -> tuple[Any, Any]:
    """Load a pretrained causal LM and extend its vocabulary with the codebook tokens.

    Returns:
        (model, tokenizer): the tokenizer holds every ``ids.vocabulary()`` token plus
        ``<user>`` and ``<sep>``; the model's embeddings are resized to match (new rows
        initialised at the mean of the old ones).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_cloud.tokenizer import SEP, USER

    tok = AutoTokenizer.from_pretrained(base_model, local_files_only=True)
    added = tok.add_tokens(ids.vocabulary())
    added += tok.add_tokens([USER, SEP], special_tokens=True)
    if tok.eos_token is None:
        raise ValidationError(f"{base_model}: the tokenizer has no EOS token")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # float32 master weights: transformers 5 loads a checkpoint in its saved dtype by default
    # (bf16 for the imported SmolLM2), which would train every weight and optimiser state in
    # bf16 (and, on CPUs without AMX / AVX512-BF16, ~10x slower); autocast adds bf16 compute
    # only where it is fast (llm_cloud.hardware)
    model = AutoModelForCausalLM.from_pretrained(
        base_model, local_files_only=True, dtype=torch.float32
    )
    model.resize_token_embeddings(len(tok), mean_resizing=True)
    logger.info("extended %s with %d tokens -> vocabulary %d", base_model, added, len(tok))
    return model.to(device), tok


def count_parameters(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def weighted_lm_loss(
    logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted next-token cross-entropy.

    Args:
        logits: [B, T, V]; position t predicts token t+1.
        ids: [B, T] tokens.
        weights: [B, T] weight of *predicting* token t (0 = not a target).

    Returns:
        (mean loss over weight, per-row weighted sum of NLL [B]).
    """
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        ids[:, 1:].reshape(-1),
        reduction="none",
    ).view(ids.shape[0], -1)  # [B, T-1]
    w = weights[:, 1:]
    per_row = (nll * w).sum(dim=1)  # [B]
    return per_row.sum() / w.sum().clamp(min=1e-9), per_row


def _autocast(config: LMConfig) -> Any:
    """bfloat16 autocast when ``config.bf16`` says so (None: where it is fast,
    :func:`llm_cloud.hardware.fast_bf16`)."""
    from llm_cloud.hardware import resolve_bf16

    enabled = resolve_bf16(config.bf16, config.device)
    return torch.autocast(
        device_type=config.device.split(":")[0], dtype=torch.bfloat16, enabled=enabled
    )


def _optimizer(model: Any, config: LMConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98))


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine down to 10 %


@torch.inference_mode()
def validation_nll(
    model: Any, vocab: ItemVocab, pairs: Sequence[tuple[np.ndarray, int]], config: LMConfig
) -> float:
    """Mean NLL (nats) of each held-out item's D answer tokens given its history."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(pairs), config.batch_size * 2):
        chunk = pairs[start : start + config.batch_size * 2]
        windows = [np.append(h[-config.max_history :], t) for h, t in chunk]
        ids, mask, weights = collate(vocab, windows, history_weight=0.0)
        # answer ID tokens only: drop the trailing <eos> weight of every row
        lengths = mask.sum(dim=1)
        weights[torch.arange(len(chunk)), lengths - 1] = 0.0
        with _autocast(config):
            logits = model(
                input_ids=ids.to(config.device), attention_mask=mask.to(config.device)
            ).logits
        _, per_row = weighted_lm_loss(logits.cpu(), ids, weights)
        total += float(per_row.sum())
        count += len(chunk)
    return total / max(1, count)


def validation_recall(
    model: Any, vocab: ItemVocab, pairs: Sequence[tuple[np.ndarray, int]], beams: int, users: int
) -> dict[str, float]:
    """Recall@10 / NDCG@10 of constrained beam search (top 10) on validation pairs."""
    from llm_cloud.backends.hf import levelwise_beam_search

    chosen = pairs[:users]
    prompts = [vocab.prompt_ids(h.tolist()) for h, _ in chosen]
    ranked = levelwise_beam_search(model.cpu().eval(), vocab, prompts, beams, 10)
    hits, gains = [], []
    for (_, target), items in zip(chosen, ranked, strict=True):
        order = [i for i, _ in items]
        rank = order.index(int(target)) + 1 if int(target) in order else 0
        hits.append(1.0 if rank else 0.0)
        gains.append(1.0 / math.log2(rank + 1) if rank else 0.0)
    return {
        "recall@10": float(np.mean(hits)),
        "ndcg@10": float(np.mean(gains)),
        "users": len(chosen),
    }


# ---- training ------------------------------------------------------------------------------
def train_lm(
    train_seqs: Sequence[np.ndarray],
    valid_pairs: Sequence[tuple[np.ndarray, int]],
    ids: SemanticIdMap,
    config: LMConfig | None = None,
    *,
    progress: bool = False,
) -> LMResult:
    """Train the codebook LM (see the module docstring).

    Args:
        train_seqs: per user, item indices of the training period in time order.
        valid_pairs: (history item indices, held-out next item) for early stopping.
        ids: the items' semantic IDs (fix the tokenizer).
        config: settings (default :class:`LMConfig`).
        progress: show tqdm bars.

    Returns:
        :class:`LMResult` with the best epoch's model.
    """
    from tqdm.auto import tqdm

    from llm_cloud.tokenizer import build_tokenizer

    cfg = config or LMConfig()
    start = time.perf_counter()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if cfg.base_model:
        model, tok = prepare_base_model(cfg.base_model, ids, cfg.device)
    else:
        tok = build_tokenizer(ids, model_max_length=cfg.max_position_embeddings)
        model = new_llama(cfg, tok).to(cfg.device)
    vocab = ItemVocab.from_tokenizer(tok, ids, max_history=cfg.max_history)
    seqs = [np.asarray(s, dtype=np.int64) for s in train_seqs if len(s) >= 2]
    if not seqs:
        raise ValidationError("no user has two or more training events; nothing to learn from")
    longest = vocab.max_prompt_len() + vocab.depth + 1
    if longest > model.config.max_position_embeddings:
        raise ValidationError(
            f"max_history {cfg.max_history} needs {longest} positions, the model has "
            f"{model.config.max_position_embeddings}; raise max_position_embeddings"
        )
    windows_per_epoch = len(build_windows(seqs, cfg.max_history, cfg.stride, None))
    steps_per_epoch = math.ceil(windows_per_epoch / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = _optimizer(model, cfg)
    result = LMResult(
        model=model,
        tokenizer=tok,
        vocab=vocab,
        config=cfg,
        num_parameters=count_parameters(model),
        num_windows=windows_per_epoch,
    )
    logger.info(
        "codebook LM: %d parameters, %d users, %d windows/epoch, %d steps/epoch, vocab %d",
        result.num_parameters, len(seqs), windows_per_epoch, steps_per_epoch, len(tok),
    )  # fmt: skip
    best_nll, best_state, bad_epochs, step = math.inf, None, 0, 0
    deadline = start + cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    for epoch in range(1, cfg.epochs + 1):
        epoch_start = time.perf_counter()
        windows = build_windows(seqs, cfg.max_history, cfg.stride, rng)
        order = rng.permutation(len(windows))
        model.train()
        losses: list[float] = []
        bar = tqdm(
            range(0, len(order), cfg.batch_size),
            desc=f"epoch {epoch}/{cfg.epochs}",
            disable=not progress,
            leave=False,
        )
        for offset in bar:
            batch = [windows[i] for i in order[offset : offset + cfg.batch_size]]
            ids_t, mask, weights = collate(vocab, batch, cfg.history_loss_weight)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * _lr_factor(step, cfg.warmup_steps, total_steps)
            with _autocast(cfg):
                logits = model(
                    input_ids=ids_t.to(cfg.device), attention_mask=mask.to(cfg.device)
                ).logits
            loss, _ = weighted_lm_loss(logits, ids_t.to(cfg.device), weights.to(cfg.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            losses.append(loss.item())
            if len(losses) % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        nll = validation_nll(model, vocab, valid_pairs, cfg) if valid_pairs else float("nan")
        row = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "valid_nll": nll,
            "seconds": time.perf_counter() - epoch_start,
        }
        result.history.append(row)
        improved = not math.isnan(nll) and nll < best_nll - cfg.min_delta
        logger.info(
            "epoch %d: train loss %.4f, valid NLL %.4f nats/item%s (%.0f s)",
            epoch, row["train_loss"], nll, " *" if improved else "", row["seconds"],
        )  # fmt: skip
        if progress:
            print(f"epoch {epoch}: train loss {row['train_loss']:.4f}, valid NLL {nll:.4f}"
                  f"{' (best)' if improved else ''}, {row['seconds']:.0f} s", flush=True)  # fmt: skip
        if improved or math.isnan(nll):
            best_nll, bad_epochs, result.best_epoch = nll, 0, epoch
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.patience:
                logger.info("early stop after epoch %d (best %d)", epoch, result.best_epoch)
                break
        if time.perf_counter() > deadline:
            logger.info("time budget of %.1f min reached after epoch %d", cfg.max_minutes, epoch)
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.cpu().eval()
    if cfg.eval_beams and valid_pairs:
        result.valid_metrics = validation_recall(
            model, vocab, valid_pairs, cfg.eval_beams, cfg.eval_users
        )
        result.valid_metrics["nll"] = best_nll
    result.seconds = time.perf_counter() - start
    return result


__all__ = [
    "SPLITS",
    "LMConfig",
    "LMResult",
    "build_windows",
    "collate",
    "count_parameters",
    "dataset_sequences",
    "encode_window",
    "new_llama",
    "prepare_base_model",
    "save_lm",
    "train_lm",
    "validation_nll",
    "validation_recall",
    "weighted_lm_loss",
    "window_ends",
]
