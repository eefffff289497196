"""TikTok micro-video dataset (MMSSL / DiffMM distribution): interactions + visual/audio features.

Source files in the ``tiktok/`` folder:

* ``trnMat.pkl``, ``valMat.pkl``, ``tstMat.pkl``: pickled ``scipy.sparse.coo_matrix``
  [U=9308, I=6710] with 1.0 where the user interacted (train / valid / test phases).
  They are read **only** through :class:`RestrictedUnpickler`, which resolves nothing but
  the scipy.sparse matrix classes and the numpy array / dtype reconstructors, so a
  tampered pickle cannot run code.
* ``image_feat.npy``, ``audio_feat.npy``: float16 [I, 128], row i = item i. They become
  the canonical features ``image`` and ``audio`` (float32), aligned with ``items.jsonl``
  (item ids are the column indices "0" .. "6709", in order).

Items have no text (``items.jsonl`` holds only ``item_id``).

Timestamps (the data has none) follow a documented synthetic scheme:

* phases are ordered: every train event < every valid event < every test event, so
  ``time_split(ds, cut=ds.info["phase_start"]["valid"])`` reproduces the published
  train / (valid + test) split, and leave-one-out takes test-phase events last;
* within a phase, events are interleaved round-robin across users: each user's k-th
  event (in ascending item-index order, the file order; the source carries no order
  inside a phase) precedes any user's (k+1)-th. A quantile cut inside the training
  phase therefore keeps every user's first events in training instead of cutting
  whole users off.
* timestamps are consecutive integers 0 .. N-1 (``info["timestamp_unit"] ==
  "synthetic_order"``).
"""

from __future__ import annotations

import io
import logging
import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recsys.data.canonical import Dataset
from recsys.errors import DataFormatError, DatasetNotFoundError

logger = logging.getLogger(__name__)

NAME = "tiktok"
PHASE_FILES = {"train": "trnMat.pkl", "valid": "valMat.pkl", "test": "tstMat.pkl"}
FEATURE_FILES = {"image": "image_feat.npy", "audio": "audio_feat.npy"}

try:  # numpy >= 2 moved the array reconstructors to numpy._core
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the classes a pickled scipy sparse matrix needs.

    Any other global (``os.system``, ``builtins.eval``, arbitrary classes) raises
    :class:`pickle.UnpicklingError` before anything is constructed. Old and new module
    paths of the same objects are mapped explicitly; nothing is imported by name.

    Example::

        with open("trnMat.pkl", "rb") as fh:
            matrix = RestrictedUnpickler(fh).load()   # scipy.sparse.coo_matrix [U, I]
    """

    ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {
        **{(mod, "coo_matrix"): sp.coo_matrix for mod in ("scipy.sparse.coo", "scipy.sparse._coo")},
        **{(mod, "csr_matrix"): sp.csr_matrix for mod in ("scipy.sparse.csr", "scipy.sparse._csr")},
        **{(mod, "csc_matrix"): sp.csc_matrix for mod in ("scipy.sparse.csc", "scipy.sparse._csc")},
        ("scipy.sparse._coo", "coo_array"): sp.coo_array,
        ("scipy.sparse._csr", "csr_array"): sp.csr_array,
        ("scipy.sparse._csc", "csc_array"): sp.csc_array,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        **{
            (mod, "_reconstruct"): _multiarray._reconstruct
            for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
        },
        **{
            (mod, "scalar"): _multiarray.scalar
            for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
        },
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only scipy.sparse matrices and numpy "
                "arrays may appear in these pickles"
            ) from None


def load_sparse_pickle(path: str | Path) -> sp.coo_matrix:
    """Unpickle a scipy sparse matrix safely; return it as COO [rows, cols]."""
    path = Path(path)
    try:
        obj = RestrictedUnpickler(io.BytesIO(path.read_bytes())).load()
    except pickle.UnpicklingError as exc:
        raise DataFormatError(path, None, f"unsafe or corrupt pickle: {exc}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DataFormatError(path, None, f"corrupt pickle ({type(exc).__name__}: {exc})") from None
    if not sp.issparse(obj):
        raise DataFormatError(
            path, None, f"expected a scipy sparse matrix, found {type(obj).__name__}"
        )
    return sp.coo_matrix(obj)


def phase_timestamps(users: np.ndarray, items: np.ndarray, offset: int) -> np.ndarray:
    """Round-robin timestamps for one phase (see the module docstring).

    Args:
        users: int [N] user index of each event.
        items: int [N] item index of each event.
        offset: first timestamp of the phase.

    Returns:
        int64 [N]: ``offset + rank`` where events are ranked by (k, user), k being the
        event's rank among its user's events in ascending item order.
    """
    by_user = np.lexsort((items, users))  # [N] events grouped by user, items ascending
    counts = np.bincount(users, minlength=int(users.max()) + 1 if len(users) else 0)
    starts = np.cumsum(counts) - counts
    k = np.empty(len(users), dtype=np.int64)
    k[by_user] = np.arange(len(users)) - starts[users[by_user]]  # [N] rank within user
    order = np.lexsort((users, k))  # [N] round-robin order
    ts = np.empty(len(users), dtype=np.int64)
    ts[order] = offset + np.arange(len(users), dtype=np.int64)
    return ts


def _load_features(folder: Path, num_items: int, matrix_file: str) -> dict[str, np.ndarray]:
    features: dict[str, np.ndarray] = {}
    for modality, filename in FEATURE_FILES.items():
        path = folder / filename
        try:
            matrix = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataFormatError(path, None, f"not a readable .npy array ({exc})") from None
        if matrix.ndim != 2 or matrix.shape[0] != num_items:
            raise DataFormatError(
                path,
                None,
                f"shape {tuple(matrix.shape)} does not match [num_items={num_items}, D] "
                f"(the item columns of {matrix_file})",
            )
        if not np.isfinite(matrix).all():
            row = int(np.flatnonzero(~np.isfinite(matrix).all(axis=1))[0])
            raise DataFormatError(path, None, f"row {row} contains NaN or Inf")
        features[modality] = matrix.astype(np.float32)  # [I, D]
    return features


def load_tiktok(folder: str | Path) -> Dataset:
    """Load the TikTok folder as a canonical :class:`Dataset` (see the module docstring).

    Example::

        ds = load_tiktok("../shared/data/tiktok")
        ds.features["image"].shape      # (6710, 128)
        ds.info["phase_start"]          # {"train": 0, "valid": 59541, "test": 62592}
    """
    folder = Path(folder)
    missing = [
        f for f in (*PHASE_FILES.values(), *FEATURE_FILES.values()) if not (folder / f).is_file()
    ]
    if missing:
        raise DatasetNotFoundError(f"{folder} lacks {', '.join(missing)} (TikTok MMSSL layout)")
    matrices = {phase: load_sparse_pickle(folder / f) for phase, f in PHASE_FILES.items()}  # [U, I]
    shape = matrices["train"].shape
    for phase, matrix in matrices.items():
        if matrix.shape != shape:
            raise DataFormatError(
                folder / PHASE_FILES[phase],
                None,
                f"shape {matrix.shape} differs from {PHASE_FILES['train']}'s {shape}",
            )
    frames: list[pd.DataFrame] = []
    phase_start: dict[str, int] = {}
    phase_events: dict[str, int] = {}
    offset = 0
    for phase, matrix in matrices.items():
        matrix.sum_duplicates()
        keep = matrix.data != 0
        users = matrix.row[keep].astype(np.int64)  # [N_p]
        items = matrix.col[keep].astype(np.int64)  # [N_p]
        frames.append(
            pd.DataFrame(
                {
                    "user_id": users.astype(str),
                    "item_id": items.astype(str),
                    "timestamp": phase_timestamps(users, items, offset),
                }
            )
        )
        phase_start[phase], phase_events[phase] = offset, len(users)
        offset += len(users)
    features = _load_features(folder, shape[1], PHASE_FILES["train"])
    items_df = pd.DataFrame({"item_id": np.arange(shape[1]).astype(str)})
    inter = pd.concat(frames, ignore_index=True)
    info = {
        "source": str(folder),
        "timestamp_unit": "synthetic_order",
        "timestamp_note": "no real time: train < valid < test phases; round-robin across users within a phase",
        "phase_start": phase_start,
        "phase_events": phase_events,
        "matrix_shape": list(shape),
        "text_columns": [],
    }
    logger.info("tiktok: %s events per phase, matrix %s", phase_events, shape)
    return Dataset(name=NAME, items=items_df, interactions=inter, features=features, info=info)
