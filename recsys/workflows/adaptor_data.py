"""Inputs of the edit generators and the frozen ranker as plain tensors.

What the training loop (:mod:`recsys.workflows.adaptor_training`) and the replay check
(:mod:`recsys.replay.adaptor_eval`) share:

* :class:`FrozenRanker`: the trained device ranker's head weights, item table and bias as
  plain tensors, with a differentiable low-rank edited head (:meth:`FrozenRanker.queries`).
* :func:`ensure_time_ranker`: the ranker trained on the time split's training period.
* Inputs: the adaptor-input contract of :mod:`recsys.adaptor_inputs` (uplink window,
  device summary, token sources), the same functions the cloud and device services
  call; :func:`resolve_token_source` picks the LM, the recent-items stand-in or no
  tokens at all (:class:`NoTokens`, the summary-only ablation); the LM directory an
  artefact names is :func:`codebook.adaptor_artifact.artifact_lm_dir`;
* :func:`build_windows`: request windows of the training users with the ranker states of
  their next-window targets; :func:`window_loss`: next-window full-softmax CE.

Shape letters: B windows (or users), W window length, N input items, L+1 ID levels,
D ranker width, I items, P target positions.

Example::

    frozen = FrozenRanker.from_ranker(Ranker.from_checkpoint(path))
    tokens = resolve_token_source("recent", ids, 20, None)
    data = build_windows(frozen, sequences, WindowConfig(), tokens)
    loss, ranks = window_loss(frozen, data, np.arange(64), edit=None, mask_seen=True)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from codebook.adaptor import GeneratedEdit
from codebook.continual import next_window_mask
from codebook.refine import lowrank_queries
from codebook.semantic_ids import SemanticIdMap
from device_ranker.edits import EditBounds
from device_ranker.ranker import Ranker
from device_ranker.train import TrainConfig, load_checkpoint, train
from recsys.adaptor_inputs import (
    LMTokens,
    NoTokens,
    RecentTokens,
    TokenSource,
    device_summary,
    item_codes,
    recent_items,
    uplink_window,
)
from recsys.data import Dataset, time_split
from recsys.errors import NotFoundError, ValidationError
from recsys.validation import Field, config_dataclass
from recsys.workflows.token_cache import CACHE_FOLDER, CachedTokens, lm_identity

logger = logging.getLogger(__name__)

TOKEN_SOURCES = ("auto", "recent", "lm", "none")


@config_dataclass
class WindowConfig:
    """How training sequences become (request, next window) pairs."""

    window: int = Field(5, ge=1)  # W: events an edit must serve (= the replay's request period)
    stride: int = Field(5, ge=1)  # events between consecutive request boundaries of one user
    min_history: int = Field(5, ge=1)  # events a device needs before its first request
    input_items: int = Field(20, ge=1)  # N: items per request (recent items or LM top-N)
    summary_items: int = Field(10, ge=1)  # items pooled into the device summary
    uplink_items: int = Field(20, ge=1)  # items of the history a request carries (cloud reads)
    # train on a seeded uniform sample of this many request windows (None = all): makes an
    # expensive token source (a pretrained LLM) affordable; arms trained with the same value
    # and seed see the same windows
    max_windows: int | None = Field(None, ge=1)
    sample_seed: int = 0


# ---- the frozen ranker as plain tensors ---------------------------------------------------
@dataclass
class FrozenRanker:
    """What the loop needs of a trained ranker (no gradients flow into it).

    Attributes:
        ranker: the device :class:`Ranker` (for user states).
        head: per layer (name, W [out, in], b [out]) in forward order.
        residual: the head adds its input to its output.
        item_table: [I, D]; item_bias: [I].
    """

    ranker: Ranker
    head: list[tuple[str, torch.Tensor, torch.Tensor]]
    residual: bool
    item_table: torch.Tensor
    item_bias: torch.Tensor

    @classmethod
    def from_ranker(cls, ranker: Ranker) -> FrozenRanker:
        m = ranker.model
        head = [
            (n, w.detach().clone(), b.detach().clone())
            for n, (w, b) in zip(m.head.layer_names(), m.head.base_weights(), strict=True)
        ]
        return cls(
            ranker,
            head,
            m.head.residual,
            m.item_table.detach().clone(),
            m.item_bias.detach().clone(),
        )

    @property
    def spec(self) -> dict[str, tuple[int, int]]:
        return {n: (int(w.shape[0]), int(w.shape[1])) for n, w, _ in self.head}

    @property
    def num_items(self) -> int:
        return int(self.item_table.shape[0])

    def queries(
        self, x: torch.Tensor, tensors: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Head with per-row low-rank edits: x [B, W, D], tensors batched [B, ...] -> [B, W, D]
        (:func:`codebook.refine.lowrank_queries`: the device head with the edit applied)."""
        return lowrank_queries(self.head, self.residual, x, tensors)

    def logits(self, q: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., I]."""
        return F.linear(q, self.item_table, self.item_bias)

    def measure_head(self) -> dict[str, dict[str, float]]:
        """Per layer: ||W||_F, max |b|, ||b||."""
        return {
            n: {
                "weight_fro": float(w.norm()),
                "bias_max_abs": float(b.abs().max()),
                "bias_norm": float(b.norm()),
            }
            for n, w, b in self.head
        }


def head_bounds(
    frozen: FrozenRanker, bound_fraction: float, bias_fraction: float, clip_fraction: float
) -> dict[str, float]:
    """Device bounds from the measured head norms, and the generators' clip values:
    ``||dW||_F <= bound_fraction * min_l ||W_l||_F``, ``|db| <= bias_fraction * max_l max|b_l|``,
    generators clip to ``clip_fraction`` of both."""
    m = frozen.measure_head()
    weight = bound_fraction * min(v["weight_fro"] for v in m.values())
    bias = bias_fraction * max(v["bias_max_abs"] for v in m.values())
    return {
        "device_max_weight_norm": weight,
        "device_max_bias_abs": bias,
        "generator_max_weight_norm": clip_fraction * weight,
        "generator_max_bias_abs": clip_fraction * bias,
    }


def device_bounds(bounds: Mapping[str, float], rank: int) -> EditBounds:
    """The :class:`EditBounds` the device validates with (composed edits may reach 2R)."""
    return EditBounds(
        max_weight_norm=bounds["device_max_weight_norm"],
        max_bias_abs=bounds["device_max_bias_abs"],
        max_rank=max(64, 2 * rank),
    )


# ---- ranker for the time split --------------------------------------------------------------
def ensure_time_ranker(
    ds: Dataset,
    quantile: float,
    path: Path,
    *,
    ranker_cfg: TrainConfig | None = None,
    retrain: bool = False,
    progress: bool = True,
) -> Path:
    """``path`` holds a ranker trained on the time split's training period (train if not).

    A sidecar ``<path>.json`` records the dataset fingerprint and the cut; a checkpoint
    without a matching sidecar is retrained.
    """
    split = time_split(ds, quantile=quantile)
    side = path.with_suffix(".json")
    want = {
        "dataset": ds.name,
        "fingerprint": ds.fingerprint(),
        "quantile": quantile,
        "cut": int(split.cut),
        "train_rows": len(split.train),
    }
    if not retrain and path.is_file() and side.is_file():
        have = json.loads(side.read_text())
        ckpt = load_checkpoint(path)
        if {k: have.get(k) for k in want} == want and (
            ckpt.get("finished") or ckpt["epoch"] >= ckpt["train_config"]["epochs"]
        ):
            return path
    logger.info("training the ranker on the time split's training period -> %s", path)
    result = train(
        ranker_cfg or TrainConfig(), ds, rows=split.train, checkpoint_path=path, progress=progress
    )
    side.write_text(
        json.dumps(
            {
                **want,
                "best_epoch": result.best_epoch,
                "best_valid": result.best_valid,
                "seconds": result.seconds,
            },
            indent=2,
        )
        + "\n"
    )
    return path


# ---- inputs (the contract lives in recsys.adaptor_inputs) ------------------------------------
class CodedTokens:
    """A :class:`recsys.adaptor_inputs.TokenSource` whose items come back as semantic IDs:
    ``__call__(windows) -> (codes [B, N, L+1], scores [B, N] or None)``, what the adaptor
    reads (the cloud service converts the same way, with the same functions)."""

    def __init__(self, source: TokenSource, codes: np.ndarray) -> None:
        self.source = source
        self.codes = np.asarray(codes, dtype=np.int64)  # [I, L+1]
        self.name = source.name
        self.n = source.n

    def __call__(self, windows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        items, scores = self.source(windows)  # [B, N], [B, N] | None
        return item_codes(items, self.codes), scores

    def close(self) -> None:
        self.source.close()


def resolve_token_source(
    source: str,
    ids: SemanticIdMap,
    n: int,
    lm_dir: Path | None,
    backend: str = "transformers",
    *,
    cache_tokens: bool = True,
) -> CodedTokens:
    """``source`` "lm", "recent", "none" or "auto": the LM when ``lm_dir`` holds a trained
    model (``recsys_lm.json``), else the recent-items stand-in; "none": no tokens
    (:class:`NoTokens`); as semantic IDs of ``ids``. The LM's answers are cached in
    ``lm_dir/token-cache`` (:mod:`recsys.workflows.token_cache`) unless ``cache_tokens``
    is false."""
    if source not in TOKEN_SOURCES:
        raise ValidationError(f"token source must be one of {TOKEN_SOURCES}, got {source!r}")
    if source == "none":
        return CodedTokens(NoTokens(n), ids.codes)
    has_lm = lm_dir is not None and (lm_dir / "recsys_lm.json").is_file()
    if source == "lm" or (source == "auto" and has_lm):
        if not has_lm:
            raise NotFoundError(
                f"no trained codebook LM at {lm_dir} (no recsys_lm.json); run `recsys train "
                "lm` first (or `recsys train llm` for a pretrained LLM aligned to the codebook)"
            )
        from llm_cloud.backends import BackendConfig, make_backend

        settings = BackendConfig(exclude_history=True)
        lm = make_backend(backend, lm_dir, settings)
        source: TokenSource = LMTokens(lm, n)
        if cache_tokens:
            identity = lm_identity(lm_dir, backend, settings)
            source = CachedTokens(source, lm_dir / CACHE_FOLDER, identity)
        return CodedTokens(source, ids.codes)
    return CodedTokens(RecentTokens(n), ids.codes)


# ---- windows --------------------------------------------------------------------------------
@dataclass
class WindowData:
    """Request windows of the training users (Nw windows, P target positions).

    Attributes:
        sequences: per user training items (time order).
        users: [Nw] user of each window; bounds: [Nw] boundary b (history = seq[:b]).
        targets: [Nw, W] next-window items (-1 padding).
        state_rows: [Nw, W] rows of ``states`` for those targets (-1 padding).
        states: [P, D] ranker state before each target position.
        summary: [Nw, S] device summary at the boundary.
        recent: [Nw, N] recent item ids (DUET input).
        codes: [Nw, N, L+1] adaptor tokens; scores: [Nw, N] or None.
    """

    sequences: list[np.ndarray]
    users: np.ndarray
    bounds: np.ndarray
    targets: np.ndarray
    state_rows: np.ndarray
    states: torch.Tensor
    summary: torch.Tensor
    recent: np.ndarray
    codes: np.ndarray
    scores: np.ndarray | None
    token_source: str

    def __len__(self) -> int:
        return len(self.users)


def sample_windows(count: int, max_windows: int | None, seed: int) -> np.ndarray:
    """Indices of the windows kept: all ``count`` of them, or a seeded uniform sample of
    ``max_windows`` in their original order (int64 [B])."""
    if max_windows is None or max_windows >= count:
        return np.arange(count, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(count, size=max_windows, replace=False)).astype(np.int64)


def build_windows(
    frozen: FrozenRanker,
    sequences: Sequence[np.ndarray],
    wcfg: WindowConfig,
    tokens: CodedTokens,
    *,
    batch_size: int = 1024,
    progress: bool = True,
) -> WindowData:
    """Ranker states for every target position, then the request windows (all of them, or
    ``wcfg.max_windows`` of them sampled with ``wcfg.sample_seed``) and their tokens."""
    t = frozen.ranker.model.cfg.max_len
    pos_user, pos_p, hists = [], [], []
    row_of: dict[tuple[int, int], int] = {}
    for u, seq in enumerate(sequences):
        for p in range(max(1, wcfg.min_history), len(seq)):
            row_of[(u, p)] = len(pos_p)
            pos_user.append(u)
            pos_p.append(p)
            hists.append(seq[max(0, p - t) : p])
    if not hists:
        raise ValidationError(
            f"no training user has more than min_history={wcfg.min_history} events"
        )
    chunks = []
    for start in tqdm(
        range(0, len(hists), batch_size), desc="ranker states", disable=not progress, leave=False
    ):
        chunks.append(frozen.ranker.user_states(hists[start : start + batch_size]))
    states = torch.cat(chunks).clone()  # [P, D] (plain tensor, not an inference tensor)

    users, bounds, targets, rows = [], [], [], []
    for u, seq in enumerate(sequences):
        for b in range(wcfg.min_history, len(seq), wcfg.stride):
            nxt = seq[b : b + wcfg.window]
            tg = np.full(wcfg.window, -1, dtype=np.int64)
            rw = np.full(wcfg.window, -1, dtype=np.int64)
            tg[: len(nxt)] = nxt
            rw[: len(nxt)] = [row_of[(u, p)] for p in range(b, b + len(nxt))]
            users.append(u)
            bounds.append(b)
            targets.append(tg)
            rows.append(rw)
    keep = sample_windows(len(users), wcfg.max_windows, wcfg.sample_seed)  # [B] sorted
    users_a, bounds_a = np.asarray(users)[keep], np.asarray(bounds)[keep]
    rows_a = np.stack(rows)[keep]
    targets_a = np.stack(targets)[keep]
    win_hists = [sequences[u][:b] for u, b in zip(users_a, bounds_a, strict=True)]
    summary = device_summary(
        frozen.item_table, win_hists, states[torch.from_numpy(rows_a[:, 0])], wcfg.summary_items
    )
    codes_l, scores_l = [], []
    for start in tqdm(
        range(0, len(win_hists), 256),
        desc=f"tokens ({tokens.name})",
        disable=not progress,
        leave=False,
    ):
        sent = [uplink_window(h, wcfg.uplink_items) for h in win_hists[start : start + 256]]
        c, s = tokens(sent)  # the cloud reads the uplinked window only
        codes_l.append(c)
        scores_l.append(s)
    scores = None if scores_l[0] is None else np.concatenate(scores_l)
    return WindowData(
        sequences=list(sequences),
        users=users_a,
        bounds=bounds_a,
        targets=targets_a,
        state_rows=rows_a,
        states=states,
        summary=summary,
        recent=recent_items(win_hists, wcfg.input_items),
        codes=np.concatenate(codes_l),
        scores=scores,
        token_source=tokens.name,
    )


def seen_masks(data: WindowData, idx: np.ndarray, num_items: int) -> torch.Tensor:
    """[B, W, I] bool: items in ``seq[:p]`` for each target position p (target excluded)."""
    hists = [data.sequences[data.users[k]][: data.bounds[k]] for k in idx]
    return next_window_mask(hists, data.targets[idx], num_items)


def generator_inputs(
    kind: str, data: WindowData, idx: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(tokens, scores, summary) of windows ``idx`` for ``kind`` "adaptor" or "duet"."""
    summary = data.summary[torch.from_numpy(idx)]
    if kind == "adaptor":
        scores = None if data.scores is None else torch.from_numpy(data.scores[idx])
        return torch.from_numpy(data.codes[idx]), scores, summary
    return torch.from_numpy(data.recent[idx]), None, summary


def window_loss(
    frozen: FrozenRanker,
    data: WindowData,
    idx: np.ndarray,
    edit: GeneratedEdit | None,
    mask_seen: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-window CE and the targets' ranks [n] (pessimistic, seen excluded)."""
    rows = torch.from_numpy(data.state_rows[idx])  # [B, W]
    tg = torch.from_numpy(data.targets[idx])  # [B, W]
    valid = tg >= 0
    x = data.states[rows.clamp_min(0)]  # [B, W, D]
    q = frozen.queries(x, None if edit is None else edit.tensors)  # [B, W, D]
    logits = frozen.logits(q)  # [B, W, I]
    if mask_seen:
        logits = logits.masked_fill(seen_masks(data, idx, frozen.num_items), float("-inf"))
    lv, tv = logits[valid], tg[valid]  # [n, I], [n]
    loss = F.cross_entropy(lv, tv)
    with torch.no_grad():
        ranks = (lv >= lv.gather(1, tv[:, None])).sum(1)
    return loss, ranks
