"""What a device server's users cost in memory: an estimate kept up to date per user.

:func:`user_bytes` estimates the bytes one :class:`~device_ranker.service.users.UserState`
holds, in O(1) (no walk over its history): ::

    USER_BYTES                                  fixed objects of a user (below)
    + sizeof(history) + sizeof(times)           the two deques' blocks (8 B a slot)
    + INT_BYTES * len(times)                    one int object per timestamp
    + sizeof(seen)                              the seen set's hash table
    + state [D] + scores [I] + P past states    tensor bytes + TENSOR_BYTES each
    + edit_bytes(edit) + len(payloads)          the active edit (see edit_bytes)

``sizeof`` is :func:`sys.getsizeof`, O(1) for deques and sets (it reads their allocated
blocks / table size). History item indices are the catalogue's own int objects (shared,
not counted). ``USER_BYTES`` is the rest of a blank user, measured with ``tracemalloc``
on CPython 3.11 (the UserState, its gate / staleness / lock objects, the empty
fit-rank and past-state deques, the user id and its slot in the store's dict);
tests/device_ranker/service/test_device_memory.py checks the Python part of the estimate
against ``tracemalloc`` (within 15 %) for users with histories. Tensors are counted by
their element bytes plus a fixed header; a user's cached state may be a row of its
ranking batch, which it then keeps alive with the batch (counted as its own row only).

:class:`MemoryMeter` keeps the sum over the users held: each user remembers what it was
last counted at (``st.mem_bytes``), and :meth:`MemoryMeter.account` adds the difference
after the user changes (an event appended, an edit installed, a ranking cached its
scores), so the total is never recomputed by walking the users.

Shapes: D model width, I catalogue items, P uplinked past states.

Example::

    meter = MemoryMeter()
    meter.account(st)          # after any change of st; O(1)
    meter.total                # bytes held by the users accounted
    meter.forget(st)           # st evicted
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from device_ranker.service.users import UserState

USER_BYTES = 2300  # a blank user's fixed objects beyond its three containers (CPython 3.11)
INT_BYTES = sys.getsizeof(1_700_000_000)  # a timestamp's int object (32 B)
TENSOR_BYTES = 160  # header of a torch.Tensor held in Python (wrapper, TensorImpl, storage)
BYTES_HEADER = sys.getsizeof(b"")  # a bytes object's header (33 B)


def tensor_bytes(t: torch.Tensor | None) -> int:
    """Element bytes plus :data:`TENSOR_BYTES` (0 for None)."""
    if t is None:
        return 0
    return t.element_size() * t.nelement() + TENSOR_BYTES


GUARD_BYTES = 900  # a UserGuard with its GuardState and empty deque (tracemalloc, CPython 3.11)
FLOAT_ITEM_BYTES = 32  # a Python float in a deque (24-byte object + 8-byte slot)


def edit_bytes(edit: Any) -> int:
    """Bytes an edit (:class:`~device_ranker.edit_apply.PreparedEdit`) adds to its user:
    per head layer the edited bias [out] and the low-rank factors ``A`` [out, r] and
    ``V`` [in, r], plus the dense weights once it materialised them. Its base weight W
    is the ranker's, shared, and not counted."""
    if edit is None:
        return 0
    weights = edit.weights
    n = 0
    for layer in getattr(weights, "layers", ()):
        n += tensor_bytes(layer.b) + tensor_bytes(layer.a) + tensor_bytes(layer.v)
    dense = getattr(weights, "_dense", None)
    if dense is not None:
        n += sum(tensor_bytes(w) + tensor_bytes(b) for w, b in dense)
    return n


def _payload_bytes(payload: bytes | None) -> int:
    return 0 if payload is None else len(payload) + BYTES_HEADER


def user_bytes(st: UserState) -> int:
    """The estimate of one user's bytes (see the module docstring); O(1) in its history."""
    n = USER_BYTES + sys.getsizeof(st.history) + sys.getsizeof(st.times)
    n += INT_BYTES * len(st.times) + sys.getsizeof(st.seen)
    n += tensor_bytes(st.state)
    if st.scores is not None:
        n += tensor_bytes(st.scores[2])
    if st.past_states:
        n += len(st.past_states) * (tensor_bytes(st.past_states[-1][1]) + 64)  # + the pair
    n += edit_bytes(st.edit) + _payload_bytes(st.edit_payload) + _payload_bytes(st.proto_payload)
    if st.guard is not None:  # the harm guard's clicks and an edit it holds out
        n += GUARD_BYTES + edit_bytes(st.guard.candidate)
        n += _payload_bytes(st.guard.candidate_payload) + _payload_bytes(st.guard.candidate_proto)
        if st.guard.clicks is not None:
            n += FLOAT_ITEM_BYTES * len(st.guard.clicks.diffs)
    if st.base_ranks is not None:  # the learned trigger's click ranks
        n += FLOAT_ITEM_BYTES * len(st.base_ranks)
    return n


class MemoryMeter:
    """The running total of :func:`user_bytes` over the users accounted."""

    def __init__(self) -> None:
        self.total = 0

    def account(self, st: UserState) -> int:
        """Re-estimate ``st`` and move the total by the change; returns the new estimate."""
        new = user_bytes(st)
        self.total += new - st.mem_bytes
        st.mem_bytes = new
        return new

    def forget(self, st: UserState) -> int:
        """``st`` leaves memory: its bytes come off the total; returns them."""
        freed, st.mem_bytes = st.mem_bytes, 0
        self.total -= freed
        return freed
