"""The prototype store: prototypes with versions, device assignments, the edit log,
experiments and arm assignments, persisted with SQLAlchemy 2.0 (SQLite file by default,
PostgreSQL in production) and migrated with Alembic.

Modules (one concern each):

* :mod:`codebook.store.models`: typed ``Mapped[...]`` models on a ``DeclarativeBase``.
* :mod:`codebook.store.blobs`: numpy/torch arrays <-> ``(bytes, dtype, shape)``, checked.
* :mod:`codebook.store.db`: ``make_engine(url)`` (SQLite WAL / PostgreSQL psycopg 3).
* :mod:`codebook.store.migrate`: ``upgrade(url)``, ``current_revision``, ``schema_diff``.
* :mod:`codebook.store.repository`: queries and writes over a ``Session`` (flush only).
* :mod:`codebook.store.service`: :class:`PrototypeStore`, one transaction per use case.
* :mod:`codebook.store.writer`: :class:`~codebook.store.writer.StoreWriter`, write-behind
  (a writer thread with its own connection: bounded queue, batched transactions, retries).
* :mod:`codebook.store.bench`: concurrent-refinement benchmark (threads / processes).
* :mod:`codebook.store.locks`: the start-up lock (``pg_advisory_xact_lock`` / SQLite's
  write lock) that makes migrations and the first prototype seeding safe when replicas
  start together on one store, and the retry around it.
* :mod:`codebook.store.transient`: :func:`~codebook.store.transient.is_transient`, which
  database errors a fresh transaction may not hit again.

Example::

    from codebook.store import PrototypeStore, VersionContent

    with PrototypeStore.open("sqlite:////tmp/store.sqlite", upgrade=True) as store:
        p = store.create_prototype("p0", VersionContent(code=np.zeros(16, np.float32)))
        store.refine_prototype(p.prototype_id, lambda s: VersionContent(code=s.code + 1))
        store.get_prototype(p.prototype_id).version        # 2
"""

from codebook.store.blobs import ArrayBlob, decode_array, encode_array
from codebook.store.db import make_engine, make_sessionmaker
from codebook.store.migrate import SchemaOutOfDateError, current_revision, head_revision, upgrade
from codebook.store.records import (
    ArmAssignmentRecord,
    DeviceAssignmentRecord,
    EditRecord,
    ExperimentRecord,
    PrototypeInfo,
    PrototypeState,
    UpdateFn,
    VersionContent,
    VersionRef,
)
from codebook.store.service import PrototypeStore, StoreBusyError

__all__ = [
    "ArmAssignmentRecord",
    "ArrayBlob",
    "DeviceAssignmentRecord",
    "EditRecord",
    "ExperimentRecord",
    "PrototypeInfo",
    "PrototypeState",
    "PrototypeStore",
    "SchemaOutOfDateError",
    "StoreBusyError",
    "UpdateFn",
    "VersionContent",
    "VersionRef",
    "current_revision",
    "decode_array",
    "encode_array",
    "head_revision",
    "make_engine",
    "make_sessionmaker",
    "upgrade",
]
