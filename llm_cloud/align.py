"""Align a pretrained LLM with the codebook (LC-Rec style), on the CPU, under a budget.

Shapes: I items, L+1 = D tokens per semantic ID, E the model's embedding width, B batch,
T tokens per sequence.

**Model.** A pretrained causal LM (SmolLM2-135M-Instruct from :mod:`llm_cloud.pretrained`,
or any HF directory) gets one new token per codebook entry plus ``<user>`` / ``<sep>``
(:func:`llm_cloud.lm_train.prepare_base_model`). The new rows are not random: the
embedding of code c at level l is the mean, over the items whose ID has c at level l, of
the mean input embedding of the item's text tokens (:func:`init_codebook_embeddings`),
so before any step an item's ID already sits near its words; ``<user>`` / ``<sep>`` start
at the embeddings of "user" / "next". Items without text (TikTok) leave the mean rows.

Text means alone are not usable tokens, though: below the first level a residual code is
shared by items of unrelated text, so on ml-100k the codebook rows had a mean pairwise
cosine of 0.97 (level a) to 0.997 (the disambiguation level), against 0.43 between
random words, at a third of a word's norm. A model reading them frozen cannot tell one
code from another, in the history or in its own half-decoded ID. So every codebook row
also gets seeded Gaussian noise at the scale of a pretrained row (``code_noise``, in
units of the per-element std) and, by default, the codebook rows train
(``train_code_rows``, :func:`train_new_rows`).

**Tasks**, mixed in one epoch (each a causal LM loss on the weighted tokens only):

1. next item from the history written as item text **and** semantic IDs: the serving
   prompt of :mod:`llm_cloud.prompts` (IDs for every item, the catalogue text of the
   ``text_items`` most recent ones) followed by ``ID(next) <eos>``; the history IDs are
   targets too (``history_loss_weight``), each predicted after its own text;
2. item text -> ID: ``<bos> TEXT(i) ID(i) <eos>``, loss on ``ID(i) <eos>``;
3. ID -> item text: ``<bos> ID(i) TEXT(i) <eos>``, loss on the text and ``<eos>``.

Tasks 2-3 cover every item with text once per epoch, in their own (short) batches.
Answers are scored by a softmax over the codebook tokens and ``<eos>`` only
(:func:`batch_loss`), the distribution the trie-constrained search ranks with.
For TikTok (no text) only task 1 runs: its visual and audio modalities enter through the
semantic IDs, whose codebook was learned from the fused visual/audio/text features.

**What trains: the top 4 blocks, the final norm and an untied output head** (default
``train_layers=4``; ``None`` = every weight), chosen by measurement on ml-100k's
held-out training users (2 threads, bf16 autocast, batch 8, ~140-token windows):

* every weight (tied embeddings): 206-266 tokens/s; LoRA r=16 on all projections with
  the embedding trainable (the new rows must learn): 300 tokens/s. Backward through
  the activations dominates at this size, so LoRA buys only 1.1x and adds a merge step.
* top 4 blocks + head: 819 tokens/s (nothing below them needs a backward pass); in
  8 minutes validation Recall@10 0.023, against 0.020 for every weight in 20 minutes
  (that run had lr 2e-4 and the full-vocabulary softmax; every weight with the current
  lr 5e-4 and restricted softmax reached 0.010 in 20 minutes on a busier machine, 218
  steps). The choice rests on speed; all three recalls are far below the small LM's.

Those three runs had the near-identical text-mean codebook rows above, frozen. The
codebook input rows now train too (``train_code_rows``: the gradient reaches them through
the frozen blocks, input gradients only, so steps cost more). Whether that pays for its
slower steps is not settled: the two runs made to decide it were too starved of CPU to
train at all (README, "Alignment"); the default rests on the cosine measurement above.

**Budget and resumption.** ``max_minutes`` is checked after every step (a sub-epoch run
is the normal case on a CPU: ml-100k's ~4,300 windows of ~140 tokens are ~40 min per
epoch). A checkpoint (weights, optimiser, position in the epoch) goes to
``OUT/checkpoint`` every ``checkpoint_minutes`` and when the budget ends; ``resume=True``
continues from it with the same data order (each epoch's order is seeded by
``(seed, epoch)``); a run that finishes its epochs deletes it. The learning rate warms up linearly and then stays constant, so a
resumed run follows the same schedule as an uninterrupted one.

Example::

    cfg = AlignConfig(max_minutes=20)
    result = align_lm(base_dir, train_seqs, valid_pairs, ids, texts, cfg, out_dir=out)
    save_lm(result, out, info={...})
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import Field

from llm_cloud.hardware import fast_bf16
from llm_cloud.lm_config import LMResult
from llm_cloud.lm_data import build_windows, collate, encode_window, pad_batch
from llm_cloud.lm_train import (
    _autocast,
    _optimizer,
    count_parameters,
    prepare_base_model,
    validation_recall,
    weighted_lm_loss,
)
from llm_cloud.prompts import ItemVocab, tokenize_texts
from recsys.errors import ValidationError
from recsys.features.text import TextField
from recsys.validation import config_dataclass

if TYPE_CHECKING:
    from codebook.semantic_ids import SemanticIdMap

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"

# The short catalogue text of an item inside a prompt, most identifying first; long plots
# and descriptions are left to the codebook's text embeddings. Rendered compactly,
# "Toy Story (1995) Animation, Children's, Comedy", so a few tokens carry the title,
# the year and the genres (or the brand and categories).
PROMPT_TEXT_FIELDS: tuple[TextField, ...] = (
    TextField("Title", ("title", "movie_title", "name")),
    TextField("Year", ("year", "release_year")),
    TextField("Genres", ("genres", "genre", "class")),
    TextField("Brand", ("brand",)),
    TextField("Categories", ("categories", "category")),
)


@config_dataclass
class AlignConfig:
    """Settings of :func:`align_lm`: fixed a priori, except ``train_layers`` (chosen on
    held-out training users); none was tuned on a replay figure.

    Attributes (prompts, see :mod:`llm_cloud.prompts`):
        max_history: items per prompt (the most recent).
        text_items: most recent history items written with their text.
        text_tokens: longest item text in a prompt (tokens).
        align_text_tokens: longest item text in the text <-> ID tasks (tokens).

    Attributes (data):
        stride: items between the ends of a user's windows.
        history_loss_weight: weight of the history-ID tokens (answer: 1).
        align_tasks: add the text -> ID and ID -> text tasks.

    Attributes (codebook tokens):
        code_noise: each codebook row also gets Gaussian noise of this many times the
            per-element std of the pretrained embeddings, so every code is a distinct
            token (0: text means only).
        train_code_rows: the codebook (and ``<user>`` / ``<sep>``) input rows train, by a
            backward pass through the frozen blocks (False: they stay at their start).

    Attributes (optimisation):
        train_layers: fine-tune only the top this many transformer blocks, the final
            norm and an untied output head (None: every weight, tied embeddings kept).
        epochs: passes over the data (a budget usually ends sooner).
        batch_size: sequences per step.
        lr: AdamW learning rate after warm-up (constant).
        weight_decay: AdamW decoupled weight decay (not on norms).
        warmup_steps: linear warm-up steps.
        grad_clip: max global gradient norm.
        max_minutes: wall-time budget of this call (None: no limit).
        checkpoint_minutes: minutes between checkpoints.
        eval_users: validation users in the final NLL and beam-search Recall@10.
        eval_beams: beam width of that Recall@10 (0: skip it).
        bf16: bfloat16 autocast (fp32 master weights); None: where bfloat16 is fast
            (:func:`llm_cloud.hardware.fast_bf16`: GPUs, CPUs with AMX/AVX512-BF16).
        seed: data order and embedding noise.
        threads: torch intra-op threads (None: leave the process setting).
        device: "cpu" or "cuda" (``--device cuda`` on a GPU machine).
    """

    max_history: int = Field(20, ge=1)
    text_items: int = Field(3, ge=0)
    text_tokens: int = Field(16, ge=0)
    align_text_tokens: int = Field(32, ge=1)
    stride: int = Field(20, ge=1)
    history_loss_weight: float = Field(1.0, ge=0)
    align_tasks: bool = True
    code_noise: float = Field(1.0, ge=0)
    train_code_rows: bool = True
    train_layers: int | None = Field(4, ge=0)
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(20, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    max_minutes: float | None = Field(None, gt=0)
    checkpoint_minutes: float = Field(5.0, gt=0)
    eval_users: int = Field(300, ge=1)
    eval_beams: int = Field(20, ge=0)
    bf16: bool | None = None
    seed: int = 0
    threads: int | None = Field(None, ge=1)
    device: str = Field("cpu", min_length=1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def catalogue_texts(items: Any) -> list[str]:
    """One short text per item (row order of the items table) for prompts; '' if none.

    ``"Title (Year) rest, ..."`` from :data:`PROMPT_TEXT_FIELDS` (each field: the first
    non-empty of its columns; lists joined with ", ").
    """
    from recsys.features.text import render_value, text_columns

    plan = dict(text_columns(items, PROMPT_TEXT_FIELDS, include_other=False))
    records = items.to_dict(orient="records")

    def value(label: str, rec: dict[str, Any]) -> str:
        return next((v for v in (render_value(rec.get(c)) for c in plan.get(label, ())) if v), "")

    out = []
    for rec in records:
        title, year = value("Title", rec), value("Year", rec)
        rest = [value(f.label, rec) for f in PROMPT_TEXT_FIELDS[2:]]
        head = f"{title} ({year})" if title and year else title or year
        out.append(" ".join(p for p in [head, *(r for r in rest if r)] if p))
    return out


@torch.no_grad()
def init_codebook_embeddings(
    model: Any,
    tok: Any,
    ids: SemanticIdMap,
    texts: Sequence[str],
    max_tokens: int = 32,
    noise: float = 0.0,
    seed: int = 0,
) -> int:
    """Set the codebook tokens' input rows to the mean text embedding of their items.

    Row of code c at level l = mean over items i with ``codes[i, l] == c`` of the mean
    input embedding of i's first ``max_tokens`` text tokens. Codes none of whose items
    has text keep their row. ``<user>`` / ``<sep>`` start at "user" / "next".

    Text means alone make poor tokens below the first level: a residual level's code is
    shared by items of unrelated text, so its mean is close to every other code's, and
    a frozen model cannot tell them apart. ``noise`` > 0 adds to every codebook row
    Gaussian noise of ``noise`` times the per-element std of the pretrained rows
    (seeded), which makes each code a distinct token at a word's scale.

    Returns:
        How many codebook rows were set from text.
    """
    from llm_cloud.tokenizer import SEP, USER

    emb = model.get_input_embeddings().weight  # [V, E]
    vocab = ids.vocabulary()
    tid = torch.as_tensor(tok.convert_tokens_to_ids(vocab))  # [V_codebook]
    sigma = float(emb[: int(tid.min())].float().std())  # the pretrained rows' scale
    token_ids = tokenize_texts(tok, texts, max_tokens)
    has_text = np.array([len(t) > 0 for t in token_ids])
    for token, word in ((USER, " user"), (SEP, " next")):
        word_ids = tok(word, add_special_tokens=False)["input_ids"]
        emb[tok.convert_tokens_to_ids(token)] = emb[word_ids].float().mean(0).to(emb.dtype)
    count = 0
    if has_text.any():
        item_mean = torch.zeros((len(token_ids), emb.shape[1]))  # [I, E]
        for i, t in enumerate(token_ids):
            if t:
                item_mean[i] = emb[t].float().mean(0)
        positions = ids.codes + np.asarray(ids.level_offsets)  # [I, L+1] vocabulary positions
        for level in range(positions.shape[1]):
            pos = positions[has_text, level]
            sums = torch.zeros((len(vocab), emb.shape[1])).index_add_(
                0, torch.as_tensor(pos), item_mean[torch.as_tensor(has_text)]
            )
            counts = np.bincount(pos, minlength=len(vocab))
            used = np.flatnonzero(counts)
            emb[tid[used]] = (sums[used] / torch.as_tensor(counts[used])[:, None]).to(emb.dtype)
            count += len(used)
    if noise > 0:
        gen = torch.Generator().manual_seed(seed)
        jitter = torch.randn((len(tid), emb.shape[1]), generator=gen) * (noise * sigma)
        emb[tid] = (emb[tid].float() + jitter).to(emb.dtype)
    return count


def train_new_rows(model: Any, tok: Any, ids: SemanticIdMap) -> torch.Tensor:
    """Let the input rows of the codebook tokens and ``<user>`` / ``<sep>`` train.

    The embedding matrix gets ``requires_grad``; a gradient hook zeroes every other row,
    so the pretrained vocabulary is untouched (AdamW moves a row only where its gradient
    was ever non-zero, as long as the weight decay is 0, the default). With frozen blocks below
    the trained ones, this costs a backward pass through them (input gradients only).

    Returns:
        The trained row indices (int64 [R]).
    """
    from llm_cloud.tokenizer import SEP, USER

    weight = model.get_input_embeddings().weight  # [V, E]
    rows = torch.as_tensor(tok.convert_tokens_to_ids([*ids.vocabulary(), USER, SEP]))
    keep = torch.zeros((weight.shape[0], 1), dtype=weight.dtype)
    keep[rows] = 1.0
    weight.requires_grad_(True)
    weight.register_hook(lambda grad: grad * keep.to(grad.device, grad.dtype))
    return rows


def alignment_examples(
    vocab: ItemVocab, tok: Any, texts: Sequence[str], max_tokens: int
) -> list[tuple[list[int], list[float]]]:
    """The text -> ID and ID -> text sequences of every item with text (tasks 2, 3)."""
    bos = [] if vocab.specials.bos is None else [vocab.specials.bos]
    eos = vocab.specials.eos
    out: list[tuple[list[int], list[float]]] = []
    for item, text in enumerate(tokenize_texts(tok, texts, max_tokens)):
        if not text:
            continue
        sid = vocab.item_tokens[item].tolist()
        out.append(
            ([*bos, *text, *sid, eos], [0.0] * (len(bos) + len(text)) + [1.0] * (len(sid) + 1))
        )
        out.append(
            ([*bos, *sid, *text, eos], [0.0] * (len(bos) + len(sid)) + [1.0] * (len(text) + 1))
        )
    return out


def epoch_batches(
    vocab: ItemVocab,
    seqs: Sequence[np.ndarray],
    align: Sequence[tuple[list[int], list[float]]],
    cfg: AlignConfig,
    epoch: int,
) -> list[list[tuple[list[int], list[float]]]]:
    """Every batch of one epoch, in a fixed order for ``(seed, epoch)``: next-item
    windows and alignment sequences in batches of their own, interleaved at random."""
    rng = np.random.default_rng([cfg.seed, epoch])
    windows = build_windows(seqs, cfg.max_history, cfg.stride, rng)
    encoded = [encode_window(vocab, w, cfg.history_loss_weight) for w in windows]
    encoded = [encoded[i] for i in rng.permutation(len(encoded))]
    extra = [align[i] for i in rng.permutation(len(align))] if cfg.align_tasks else []
    b = cfg.batch_size
    batches = [encoded[i : i + b] for i in range(0, len(encoded), b)]
    batches += [extra[i : i + b] for i in range(0, len(extra), b)]
    return [batches[i] for i in rng.permutation(len(batches))]


def freeze_below(model: Any, train_layers: int) -> None:
    """Train only the top ``train_layers`` blocks, the final norm and the output head.

    The output head is untied from the input embeddings first (a copy), so the codebook
    tokens keep their text-derived input rows while their output rows learn; nothing
    below the trained blocks needs a backward pass (~3x more steps per minute on a CPU).
    """
    from torch import nn

    if model.config.tie_word_embeddings:
        head = model.get_output_embeddings()
        head.weight = nn.Parameter(model.get_input_embeddings().weight.detach().clone())
        model.config.tie_word_embeddings = False
    model.requires_grad_(False)
    blocks = model.model.layers
    for block in blocks[len(blocks) - min(train_layers, len(blocks)) :]:
        block.requires_grad_(True)
    model.model.norm.requires_grad_(True)
    model.get_output_embeddings().requires_grad_(True)


def answer_tokens(vocab: ItemVocab) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens an answer can hold (every codebook token and <eos>): (allowed int64
    [A], index int64 [V]: each token's position in ``allowed``, -1 for the others)."""
    tokens = np.unique(vocab.item_tokens.reshape(-1))
    allowed = torch.as_tensor(np.append(tokens, vocab.specials.eos), dtype=torch.long)
    index = torch.full((vocab.vocab_size,), -1, dtype=torch.long)
    index[allowed] = torch.arange(len(allowed))
    return allowed, index


def batch_loss(
    model: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    answers: tuple[torch.Tensor, torch.Tensor],
    cfg: AlignConfig,
) -> torch.Tensor:
    """Weighted next-token loss of one batch ([B, T] each).

    When every weighted target is an answer token (next-item windows, text -> ID), the
    softmax runs over the allowed [A] tokens of ``answers`` (:func:`answer_tokens`) only:
    the distribution the trie-
    constrained search scores with (it renormalises over valid children), and ~20 %
    less compute than the 49k-token head. Otherwise (ID -> text) over the full vocabulary.
    """
    dev = cfg.device
    ids, mask, weights = ids.to(dev), mask.to(dev), weights.to(dev)
    allowed, index = (t.to(dev) for t in answers)
    targets = index[ids]  # [B, T]: position in allowed, -1 elsewhere
    if bool(((weights > 0) & (targets < 0)).any()):
        logits = model(input_ids=ids, attention_mask=mask).logits
        return weighted_lm_loss(logits, ids, weights)[0]
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, E]
    logits = hidden @ model.get_output_embeddings().weight[allowed].T  # [B, T, A]
    return weighted_lm_loss(logits, targets.clamp(min=0), weights)[0]


@torch.inference_mode()
def answer_nll(
    model: Any,
    vocab: ItemVocab,
    pairs: Sequence[tuple[np.ndarray, int]],
    answers: tuple[torch.Tensor, torch.Tensor],
    cfg: AlignConfig,
) -> float:
    """Mean NLL (nats) of each held-out item's ID tokens given its history, under the
    answer softmax the search ranks with (:func:`batch_loss`); the output head runs on
    the answer tokens only, so this costs one forward pass of the validation prompts."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(pairs), cfg.batch_size * 2):
        chunk = pairs[start : start + cfg.batch_size * 2]
        windows = [np.append(h[-cfg.max_history :], t) for h, t in chunk]
        ids, mask, weights = collate(vocab, windows, history_weight=0.0)  # [B, T] each
        weights[torch.arange(len(chunk)), mask.sum(dim=1) - 1] = 0.0  # not the <eos>
        with _autocast(cfg):
            loss = batch_loss(model, ids, mask, weights, answers, cfg)
        total += float(loss) * float(weights.sum())
        count += len(chunk)
    return total / max(1, count)


def _save_checkpoint(
    path: Path, model: Any, optimizer: Any, state: dict[str, Any], cfg: AlignConfig
) -> None:
    from codebook.io import atomic_write

    path.mkdir(parents=True, exist_ok=True)
    blob = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "state": state,
        "config": cfg.to_dict(),
    }
    atomic_write(path / "state.pt", lambda fh: torch.save(blob, fh))
    logger.info("checkpoint at epoch %d batch %d -> %s", state["epoch"], state["batch"], path)


def _load_checkpoint(path: Path, model: Any, optimizer: Any, cfg: AlignConfig) -> dict[str, Any]:
    blob = torch.load(path / "state.pt", map_location=cfg.device, weights_only=False)
    saved = {k: v for k, v in blob["config"].items() if k not in _BUDGET_FIELDS}
    mine = {k: v for k, v in cfg.to_dict().items() if k not in _BUDGET_FIELDS}
    if saved != mine:
        diff = sorted(k for k in mine if saved.get(k) != mine[k])
        raise ValidationError(
            f"the checkpoint at {path} was made with other settings ({', '.join(diff)}); "
            "resume with the same settings or delete the checkpoint to start over"
        )
    model.load_state_dict(blob["model"])
    optimizer.load_state_dict(blob["optimizer"])
    return dict(blob["state"])


# settings that may change between a run and its resumption
_BUDGET_FIELDS = {"max_minutes", "checkpoint_minutes", "threads", "eval_users", "eval_beams"}


def align_lm(
    base_model: str | Path,
    train_seqs: Sequence[np.ndarray],
    valid_pairs: Sequence[tuple[np.ndarray, int]],
    ids: SemanticIdMap,
    texts: Sequence[str],
    config: AlignConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
) -> LMResult:
    """Extend ``base_model`` with the codebook and fine-tune it (module docstring).

    Args:
        base_model: HF causal-LM directory (e.g. :func:`llm_cloud.pretrained.pretrained_dir`).
        train_seqs: per user, training-period item indices in time order.
        valid_pairs: (history, held-out next item) of held-out positions.
        ids: the items' semantic IDs.
        texts: [I] catalogue text per item ('' for none), e.g. :func:`catalogue_texts`.
        config: settings (default :class:`AlignConfig`).
        out_dir: where checkpoints go (``OUT/checkpoint``); None: no checkpoints.
        resume: continue from ``OUT/checkpoint`` if it exists.
        progress: tqdm bar over steps.

    Returns:
        :class:`LMResult` (the vocabulary carries the item text and length policy;
        ``history`` has one row per epoch or partial epoch).
    """
    from tqdm.auto import tqdm

    cfg = config or AlignConfig()
    start = time.perf_counter()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if len(texts) != ids.num_items:
        raise ValidationError(f"{len(texts)} item texts for {ids.num_items} items")
    seqs = [np.asarray(s, dtype=np.int64) for s in train_seqs if len(s) >= 2]
    if not seqs:
        raise ValidationError("no user has two or more training events; nothing to learn from")
    model, tok = prepare_base_model(str(base_model), ids, "cpu")
    rows = init_codebook_embeddings(
        model, tok, ids, texts, cfg.align_text_tokens, cfg.code_noise, cfg.seed
    )
    untrained_values = 0  # embedding values that carry requires_grad but never move
    if cfg.train_layers is not None:
        freeze_below(model, cfg.train_layers)
        if cfg.train_code_rows:
            weight = model.get_input_embeddings().weight  # [V, E]
            trained = len(train_new_rows(model, tok, ids))
            untrained_values = (weight.shape[0] - trained) * weight.shape[1]
    model = model.to(cfg.device)
    vocab = ItemVocab.from_tokenizer(tok, ids, max_history=cfg.max_history)
    vocab = vocab.with_item_text(tok, texts, cfg.text_items, cfg.text_tokens)
    align = alignment_examples(vocab, tok, texts, cfg.align_text_tokens)
    answers = answer_tokens(vocab)
    optimizer = _optimizer(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    result = LMResult(
        model=model,
        tokenizer=tok,
        vocab=vocab,
        config=cfg,
        num_parameters=count_parameters(model) - untrained_values,  # trained values only
    )
    ckpt = Path(out_dir) / CHECKPOINT_DIR if out_dir is not None else None
    state = {"epoch": 1, "batch": 0, "step": 0, "tokens": 0, "seconds": 0.0, "history": []}
    if resume and ckpt is not None and (ckpt / "state.pt").is_file():
        state = _load_checkpoint(ckpt, model, optimizer, cfg)
        print(f"resuming from {ckpt}: epoch {state['epoch']}, batch {state['batch']}", flush=True)
    logger.info(
        "aligning %s: %d parameters, %d users, %d alignment sequences, %d codebook rows from text",
        base_model, result.num_parameters, len(seqs), len(align), rows,
    )  # fmt: skip
    deadline = start + cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    next_ckpt = time.perf_counter() + cfg.checkpoint_minutes * 60
    stopped = "epochs"
    while state["epoch"] <= cfg.epochs:
        batches = epoch_batches(vocab, seqs, align, cfg, state["epoch"])
        result.num_windows = len(batches)
        model.train()
        losses: list[float] = []
        bar = tqdm(
            total=len(batches),
            initial=state["batch"],
            desc=f"epoch {state['epoch']}/{cfg.epochs}",
            disable=not progress,
            leave=False,
        )
        run_start = time.perf_counter()
        while state["batch"] < len(batches):
            ids_t, mask, weights = pad_batch(batches[state["batch"]], vocab.specials.pad)
            lr = cfg.lr * min(1.0, (state["step"] + 1) / max(1, cfg.warmup_steps))
            for group in optimizer.param_groups:
                group["lr"] = lr
            with _autocast(cfg):
                loss = batch_loss(model, ids_t, mask, weights, answers, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            optimizer.step()
            losses.append(loss.item())
            state["batch"] += 1
            state["step"] += 1
            state["tokens"] += int(mask.sum())
            bar.update(1)
            if len(losses) % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
            now = time.perf_counter()
            if now > deadline:
                stopped = "budget"
                break
            if ckpt is not None and now > next_ckpt:
                _save_checkpoint(ckpt, model, optimizer, state, cfg)
                next_ckpt = now + cfg.checkpoint_minutes * 60
        bar.close()
        state["seconds"] += time.perf_counter() - run_start
        state["history"].append(
            {
                "epoch": state["epoch"],
                "batches": state["batch"],
                "of": len(batches),
                "train_loss": float(np.mean(losses)) if losses else float("nan"),
                "seconds": time.perf_counter() - run_start,
            }
        )
        if stopped == "budget":
            break
        state["epoch"] += 1
        state["batch"] = 0
    if ckpt is not None and stopped == "budget":
        _save_checkpoint(ckpt, model, optimizer, state, cfg)
    elif ckpt is not None and ckpt.exists():
        shutil.rmtree(ckpt)  # finished: a later --resume starts over, never from a stale state
    model.eval()
    result.history = state["history"]
    result.best_epoch = int(state["epoch"])
    chosen = list(valid_pairs)[: cfg.eval_users]
    if chosen:
        result.valid_metrics = {"nll": answer_nll(model, vocab, chosen, answers, cfg)}
        if cfg.eval_beams:  # in the dtype the transformers backend will serve it in
            served = model.cpu()
            if fast_bf16("cpu"):
                served = copy.deepcopy(served).to(torch.bfloat16)
            result.valid_metrics |= validation_recall(
                served, vocab, chosen, cfg.eval_beams, cfg.eval_users
            )
    model.cpu()
    result.seconds = time.perf_counter() - start
    result.valid_metrics |= {
        "stopped_by": stopped,
        "steps": state["step"],
        "tokens": state["tokens"],
        "train_seconds": state["seconds"],
        "tokens_per_second": state["tokens"] / max(state["seconds"], 1e-9),
        "codebook_rows_from_text": rows,
        "alignment_sequences": len(align),
    }
    return result


__all__ = [
    "PROMPT_TEXT_FIELDS",
    "AlignConfig",
    "align_lm",
    "alignment_examples",
    "answer_nll",
    "catalogue_texts",
    "epoch_batches",
    "init_codebook_embeddings",
    "train_new_rows",
]
