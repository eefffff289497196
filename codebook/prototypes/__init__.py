"""Prototypes of edits: k-means over edit codes, online refinement, versions in the store.

Devices with similar behaviour share a **prototype**: an edit code (the generator's
code space, see :mod:`codebook.adaptor`) and the bounded head edit decoded from it. A
device's head is ``base + prototype edit + its own bounded residual``:

* prototype edit ``P = clip(decode(c_p), (1 - rho) * bound)``;
* residual ``R = clip(rank-R_res SVD of (E_u - P), rho * bound)`` where ``E_u`` is the
  device's own generated edit (low-rank U diag(s) V^T plus bias),

so ``||P + R||_F <= bound`` per layer whatever prototype version the device holds (the
triangle inequality), and the device checks exactly that bound. The downlink of one edit
is the residual plus (prototype id, version); a prototype's own tensors are fetched once
per version ("what changed since version v").

Lifecycle:

1. :func:`fit_prototypes`: faiss k-means of the training users' edit codes (one per
   training window) into P centroids; :meth:`PrototypeBank.create` stores each as
   version 1 (reason "init") with its decoded edit tensors, member count and residual
   statistics.
2. Online, as edits arrive (:meth:`PrototypeBank.observe`): the device is assigned to
   the nearest prototype code; the prototype's code follows the running mean of its
   members' codes (``c <- (n c + sum of new codes) / (n + k)``, n capped at
   ``max_count`` so it keeps adapting); every ``refine_every`` member edits become ONE
   new version (reason "refine") through :meth:`codebook.store.PrototypeStore.refine_prototype`,
   whose update reads the latest stored version, so concurrent refiners lose nothing.
3. Spawn: when at least ``spawn_fraction`` of a prototype's last ``spawn_window``
   members had a residual norm above ``spawn_threshold`` (default: the
   ``spawn_quantile`` of the training residual norms), a new prototype is created
   (reason "spawn", parent = that version) at the mean code of those far members.

Shape letters: U codes, C code width, P prototypes, R rank.

Modules: :mod:`.config` (:class:`PrototypeConfig`, k-means), :mod:`.algebra` (prototype
and residual edits), :mod:`.bank` (:class:`PrototypeBank`, versions in the store).

Example::

    centroids, info = fit_prototypes(codes, PrototypeConfig(num_prototypes=16))
    bank = PrototypeBank.create(store, centroids, decode, spec, cfg, bound=2.0,
                                bias_bound=0.1, train_codes=codes)
    pid = bank.assign(code)                           # nearest prototype
    version, proto_edit = bank.edit(pid)              # flat tensors, version
    residual, norm = bank.residual(user_edit, pid)    # flat, bounded by rho * bound
    changes = bank.observe("device-7", code, norm, pid)   # maybe new versions / spawns
    store.changes_since(pid, version)                 # what changed since version v
"""

from codebook.prototypes.algebra import (
    DecodeFn,
    clip_lowrank,
    dense_delta,
    layer_names,
    prototype_edits,
    residual_edit,
)
from codebook.prototypes.bank import BankChange, PrototypeBank
from codebook.prototypes.config import PrototypeConfig, fit_prototypes, nearest_prototype

__all__ = [
    "BankChange",
    "DecodeFn",
    "PrototypeBank",
    "PrototypeConfig",
    "clip_lowrank",
    "dense_delta",
    "fit_prototypes",
    "layer_names",
    "nearest_prototype",
    "prototype_edits",
    "residual_edit",
]
