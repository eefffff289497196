"""The device's ranking: many users' Recommend calls (and evaluation probes) at once.

:class:`Ranking` owns the device's ranking thread and its micro-batcher
(:class:`recsys.serving.batching.MicroBatcher`): :meth:`Ranking.rank` snapshots a user
(:class:`~device_ranker.service.users.UserState`) into a :class:`RankJob`, queues it, and
caches the user state [D] the pass computed (it depends only on the history, so it is
computed once per history change). The same thread decodes and composes edits
(:mod:`device_ranker.service.cloud_edits`).

:func:`rank_batch` runs on the device's ranking thread for a micro-batch of
:class:`RankJob` snapshots (no shared state): the user states (cached ones reused), the
head with each user's own edit in one batched pass, the catalogue scores, the
candidate / history mask and one top-k; probe items get their scores and ranks from the
same scores (:func:`probe_ranks`, ties pessimistic like ``recsys.metrics.target_ranks``).
On a large catalogue (the ranker's :meth:`~device_ranker.ranker.Ranker.ann_index`), jobs
without candidates, probes or kept scores take their top-k from the faiss pre-selection
(:func:`device_ranker.ann.ann_topk`, exact scores of the candidates); the others are
scored over the full catalogue as before.

Shapes: B jobs, D model width, I catalogue items, K top-k, P probes.

Example::

    ranking = Ranking(ranker, BatchConfig(max_batch=64, max_wait_ms=2.0))
    out = await ranking.rank(st, edit=st.edit, k=10, exclude=st.seen)    # RankOutput
    out = rank_batch(ranker.model, ranker.num_items, [RankJob(history, None, None, 10,
                     exclude=seen, candidates=None, probes=np.array([target]))])
    out[0].items, out[0].probe_ranks
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from device_ranker.edit_apply import PreparedEdit
from device_ranker.features import history_kjt
from device_ranker.head import queries_per_user
from device_ranker.ranker import Ranker
from device_ranker.service.users import UserState
from recsys.serving.batching import BatchConfig, MicroBatcher


@dataclass(frozen=True)
class RankJob:
    """One Recommend, as handed to the ranking thread (a snapshot, no shared state)."""

    history: np.ndarray  # [H] item indices, oldest first
    state: torch.Tensor | None  # cached [D] or None (compute)
    edit: PreparedEdit | None
    k: int
    exclude: np.ndarray | None  # item indices to exclude (seen)
    candidates: np.ndarray | None  # allowed item indices (None = all)
    probes: np.ndarray | None = None  # [P] item indices to score and rank (evaluation)
    full: bool = False  # needs the full-catalogue scores (RankOutput.raw), never pre-selected


@dataclass(frozen=True)
class RankOutput:
    items: list[int]
    scores: list[float]
    state: torch.Tensor  # [D] (to cache)
    probe_scores: list[float] = field(default_factory=list)  # [P]
    probe_ranks: list[int] = field(default_factory=list)  # [P], 1-based
    rankable: int = 0  # items that could be ranked (catalogue or candidates, minus excluded)
    raw: torch.Tensor | None = None  # [I] full-catalogue scores (nothing masked), a row view


def rank_batch(
    model: Any, num_items: int, jobs: list[RankJob], ann: Any | None = None
) -> list[RankOutput]:
    """B jobs -> top-k each, plus the probes' scores and ranks, in one pass.

    User states [B, D] (cached ones reused, the others from the encoder), the head with
    each job's own weights (one batched pass, ``queries_per_user``), catalogue
    scores [B, I], the candidate / seen mask [B, I], one top-k.

    Args:
        model: the ranker's model (``Ranker.model``); num_items: I.
        jobs: B :class:`RankJob`.
        ann: the ranker's :class:`~device_ranker.ann.AnnIndex` (None = all exact).
    """
    with torch.inference_mode():
        missing = [b for b, j in enumerate(jobs) if j.state is None]
        states = [j.state for j in jobs]
        if missing:
            fresh = model.user_states(
                history_kjt([jobs[b].history for b in missing], model.cfg.max_len)
            )  # [M, D]
            for row, b in enumerate(missing):
                states[b] = fresh[row]
        x = torch.stack(states)  # [B, D]
        q = queries_per_user(
            model.head, x, [None if j.edit is None else j.edit.weights for j in jobs], "auto"
        )  # a user's edit stays factored until its rows have paid for materialising it
        if ann is not None:
            pre = [b for b, j in enumerate(jobs) if _preselect(j)]
            if pre:
                return _rank_mixed(model, num_items, jobs, states, q, ann, pre)
        raw = model.item_scores(q)  # [B, I]
        mask = unrankable_mask(jobs, num_items)  # [B, I]
        scores = raw.masked_fill(mask, float("-inf"))
        kmax = min(max(j.k for j in jobs), num_items)
        top = torch.topk(scores, kmax, dim=1)
        # topk sorts descending, so a row's -inf entries (masked items) come last
        valid = (top.values != float("-inf")).sum(dim=1).tolist()  # [B]
        items, values = top.indices.tolist(), top.values.tolist()
        probed = {b: probe_ranks(raw[b], scores[b], mask[b], j.probes)
                  for b, j in enumerate(jobs) if j.probes is not None}  # fmt: skip
    out = []
    for b, j in enumerate(jobs):
        n = min(j.k, kmax, valid[b])
        p_scores, p_ranks, rankable = probed.get(b, ([], [], 0))
        out.append(
            RankOutput(
                items=items[b][:n],
                scores=values[b][:n],
                state=states[b],
                probe_scores=p_scores,
                probe_ranks=p_ranks,
                rankable=rankable,
                raw=raw[b],
            )
        )
    return out


def _preselect(job: RankJob) -> bool:
    """Whether a job may take its top-k from the ANN pre-selection."""
    return job.candidates is None and job.probes is None and not job.full and job.k > 0


def _rank_mixed(
    model: Any,
    num_items: int,
    jobs: list[RankJob],
    states: list[torch.Tensor],
    q: torch.Tensor,
    ann: Any,
    pre: list[int],
) -> list[RankOutput]:
    """Jobs ``pre`` through the ANN index, the others over the full catalogue (rows of
    ``rank_batch``; states B x [D], q [B, D])."""
    from device_ranker.ann import ann_topk

    out: list[RankOutput | None] = [None] * len(jobs)
    kmax = min(max(jobs[b].k for b in pre), num_items)
    items, values = ann_topk(ann, q[pre], [jobs[b].exclude for b in pre], kmax)  # [P, K]
    valid = torch.isfinite(values).sum(dim=1).tolist()
    items_l, values_l = items.tolist(), values.tolist()
    for row, b in enumerate(pre):
        n = min(jobs[b].k, kmax, valid[row])
        out[b] = RankOutput(items=items_l[row][:n], scores=values_l[row][:n], state=states[b])
    rest = [b for b in range(len(jobs)) if out[b] is None]
    if rest:  # the exact path, with the states already computed
        sub = [replace(jobs[b], state=states[b]) for b in rest]
        for b, o in zip(rest, rank_batch(model, num_items, sub), strict=True):
            out[b] = o
    return out  # type: ignore[return-value]


def unrankable_mask(jobs: Sequence[RankJob], num_items: int) -> torch.Tensor:
    """[B, I] bool, True = not rankable for job b: outside its candidates (when it has
    a candidate list) or in its excluded items (exclusion wins)."""
    mask = torch.zeros(len(jobs), num_items, dtype=torch.bool)
    cand = [b for b, j in enumerate(jobs) if j.candidates is not None]
    if cand:
        mask[cand] = True
        mask[_rows_cols([jobs[b].candidates for b in cand], cand)] = False
    excl = [b for b, j in enumerate(jobs) if j.exclude is not None and len(j.exclude)]
    if excl:
        mask[_rows_cols([jobs[b].exclude for b in excl], excl)] = True
    return mask


def _rows_cols(indices: Sequence[np.ndarray], rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row item index arrays -> (row [N], col [N]) for one advanced-index assignment."""
    cols = np.concatenate([np.asarray(i, dtype=np.int64) for i in indices])  # [N]
    lens = np.fromiter((len(i) for i in indices), np.int64, len(indices))
    return torch.from_numpy(np.repeat(np.asarray(rows, dtype=np.int64), lens)), torch.from_numpy(
        cols
    )


def probe_ranks(
    raw: torch.Tensor, masked: torch.Tensor, mask: torch.Tensor, probes: np.ndarray
) -> tuple[list[float], list[int], int]:
    """Scores and 1-based ranks of P probes in one row.

    raw [I] scores, masked [I] (-inf where not rankable), mask [I] (True = not
    rankable), probes [P]. rank_p = #{rankable i : s_i >= s_p} + [p not rankable]:
    the probe always counts itself (pessimistic ties, as ``target_ranks``).
    """
    idx = torch.from_numpy(probes)
    p_scores = raw[idx]  # [P]
    above = (masked[None, :] >= p_scores[:, None]).sum(dim=1)  # [P]
    ranks = above + mask[idx].to(above.dtype)  # [P]
    return p_scores.tolist(), ranks.tolist(), int((~mask).sum())


class Ranking:
    """The ranking thread of one device server and its Recommend micro-batcher.

    Args:
        ranker: the device's ranker (frozen model).
        batch: :class:`BatchConfig` of the micro-batcher.
        inline: run the batches on the event loop's thread (no hand-off).
    """

    def __init__(self, ranker: Ranker, batch: BatchConfig, *, inline: bool = False) -> None:
        self.ranker = ranker
        self.inline = inline
        ranker.ann_index()  # a large catalogue's faiss index is built now, not on a request
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="ranker")
        self.batcher: MicroBatcher[RankJob, RankOutput] = MicroBatcher(
            self.rank_batch, batch, name="recommend", executor=self.executor, inline=inline
        )

    def rank_batch(self, jobs: list[RankJob]) -> list[RankOutput]:
        """B jobs -> top-k each (runs on the ranking thread)."""
        return rank_batch(self.ranker.model, self.ranker.num_items, jobs, self.ranker.ann_index())

    async def rank(
        self,
        st: UserState,
        *,
        edit: PreparedEdit | None,
        k: int,
        exclude: Collection[int] | None,
        candidates: np.ndarray | None = None,
        probes: np.ndarray | None = None,
        keep_scores: bool = False,
    ) -> RankOutput:
        """Rank for user ``st`` now (its history, cached state, the given edit and
        exclusions); caches the state the pass computed unless an event came meanwhile,
        and with ``keep_scores`` its full-catalogue scores under ``edit`` (``st.scores``:
        the fit signal then ranks the next click without another pass)."""
        version = st.version
        job = RankJob(
            history=np.fromiter(st.history, np.int64, len(st.history)),
            state=st.state if st.state_version == version else None,
            edit=edit,
            k=k,
            exclude=None if exclude is None else np.fromiter(exclude, np.int64, len(exclude)),
            candidates=candidates,
            probes=probes,
            full=keep_scores,
        )
        out = await self.batcher.submit(job)
        if st.version == version and st.state_version != version:
            st.state, st.state_version = out.state, version
        if keep_scores and st.version == version and out.raw is not None:
            st.scores = (version, edit, out.raw.clone())  # [I], not a view of the batch
        return out

    async def probe_ranks(
        self, st: UserState, edits: Sequence[PreparedEdit | None], item: int
    ) -> list[int]:
        """The 1-based rank of ``item`` for user ``st`` under each of ``edits`` (None =
        the base head), among the catalogue minus the user's history: one pass over the
        E jobs on the ranking thread, without the micro-batcher's wait (the harm guard
        and the learned trigger rank every click; Recommend's batching window would add
        its wait to every RecordEvent). Caches the user state like :meth:`rank`."""
        version = st.version
        history = np.fromiter(st.history, np.int64, len(st.history))
        exclude = np.fromiter(st.seen, np.int64, len(st.seen))
        state = st.state if st.state_version == version else None
        probe = np.asarray([item], dtype=np.int64)
        jobs = [RankJob(history, state, edit, 0, exclude, None, probe) for edit in edits]
        if self.inline:
            outs = self.rank_batch(jobs)
        else:
            loop = asyncio.get_running_loop()
            outs = await loop.run_in_executor(self.executor, self.rank_batch, jobs)
        if st.version == version and st.state_version != version:
            st.state, st.state_version = outs[0].state, version
        return [int(o.probe_ranks[0]) for o in outs]
