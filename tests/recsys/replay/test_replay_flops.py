"""The replay's device FLOPs of a cloud edit: validation of the factored edit per request,
the factored head's extra FLOPs per event it serves (hand-worked counts)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from device_ranker.edits import EditBounds, HeadEdit, LayerEdit, random_edit
from device_ranker.head import EditableHead
from recsys.replay.costs import apply_flops, event_flops
from recsys.replay.edits import DeviceEdit, EditMaker

SPEC = {"fc0": (128, 64), "fc1": (64, 128)}


def test_factored_edit_costs_grams_not_materialisation() -> None:
    head = EditableHead((64, 128, 64))
    edit = random_edit(head, rank=12, generator=torch.Generator().manual_seed(0))
    # per layer: U*s (out r) + Grams 2 r^2 (out + in + 1) + bias max and add (3 out)
    fold = 12 * (128 + 64)
    grams = 2 * 2 * 144 * (128 + 64 + 1)
    assert apply_flops(edit, SPEC) == fold + grams + 3 * (128 + 64)
    # per scored event: x V (2 in r) + (x V) A^T (2 r out) + the add (out)
    assert event_flops(edit, SPEC) == 2 * (2 * 12 * 192) + 128 + 64
    materialised = 2 * (2 * 128 * 64 * 12)  # what the dense form's A V^T alone costs
    assert apply_flops(edit, SPEC) < materialised / 2


def test_dense_parts_and_large_ranks_count_the_dense_work() -> None:
    dense = HeadEdit({"fc0": LayerEdit(dense=torch.zeros(128, 64), bias=torch.zeros(128))})
    assert apply_flops(dense, SPEC) == 3 * 128 * 64 + 3 * 128  # norm (2 out in) + add
    assert event_flops(dense, SPEC) == 0
    r = 43  # 43 * 192 >= 128 * 64: materialised
    big = HeadEdit({"fc0": LayerEdit(u=torch.zeros(128, r), s=torch.ones(r), v=torch.zeros(64, r))})
    assert apply_flops(big, SPEC, EditBounds()) == 128 * r + 2 * 128 * 64 * r + 3 * 128 * 64
    assert event_flops(big, SPEC) == 0


def test_each_request_pays_the_events_it_serves() -> None:
    maker = SimpleNamespace(_protos={})
    prepared = None  # costs() reads only the counts
    edits = {
        L: DeviceEdit(prepared, 1.0, 2.0, device_flops=100.0, event_flops=10.0, stream_len=20)
        for L in (5, 8, 15)
    }
    acc = EditMaker.costs(maker, np.array([5, 8, 15]), edits)
    # 5 serves positions 5-7, 8 serves 8-14, 15 serves 15-19 (the device's last event)
    assert acc.device_flops == [100.0 + 10 * 3, 100.0 + 10 * 7, 100.0 + 10 * 5]
    edits[15].stream_len = None  # unknown end: the last request counts one event
    assert EditMaker.costs(maker, np.array([5, 8, 15]), edits).device_flops[-1] == 110.0
