"""The prototype store's use cases, one transaction each: :class:`PrototypeStore`.

Every public method opens a session, runs ``with session.begin():`` around repository
calls, and returns plain records (:mod:`codebook.store.records`), never ORM objects.

Concurrent refinement (many writers refining one prototype) must lose no update. Two
strategies are implemented; ``"lock"`` is the default, chosen on measurements
(``recsys db bench``, :mod:`codebook.store.bench`: with 8 writers on one prototype it is
faster on both backends and never retries, while the optimistic one retried 2-4 times
per refinement):

* ``"lock"`` (pessimistic): the transaction takes the prototype's write lock before it
  reads the latest version: ``SELECT ... FOR NO KEY UPDATE`` on PostgreSQL, ``BEGIN
  IMMEDIATE`` on SQLite (SQLite has one writer at a time anyway). Writers queue; each
  computes its update once. Transient errors (deadlock, serialization failure, lock
  timeout) are retried.
* ``"optimistic"``: read without a lock, compute, then insert version ``v + 1`` and move
  ``current_version`` only if it is still ``v``; the unique (prototype_id, version)
  constraint rejects a second ``v + 1``. A loser rolls back and starts over, so update
  functions may run several times and work is wasted under contention.

In both, an exception raised by the update function rolls the whole transaction back:
the last committed version stays current and readable. Retries (:func:`is_transient`
errors only) go through tenacity: up to ``max_attempts`` tries with jittered exponential
backoff (at most 50 ms), each logged at WARNING; then :class:`StoreBusyError`.

Example::

    store = PrototypeStore.open("sqlite:////tmp/store.sqlite", upgrade=True)
    p = store.create_prototype("sports", VersionContent(code=np.zeros(8, np.float32)))
    p2 = store.refine_prototype(p.prototype_id, lambda s: VersionContent(code=s.code + 1))
    p2.version, store.changes_since(p.prototype_id, 1)[0].version      # 2, 2
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

from sqlalchemy import Engine
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from codebook.store.db import WRITE_TRANSACTION, make_engine, make_sessionmaker
from codebook.store.locks import exclusive, lock_key, retry_startup
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
    arm_record,
    check_name,
    device_record,
    edit_record,
    experiment_record,
    prototype_info,
    prototype_state,
)
from codebook.store.repository import (
    EDIT_LOG_IDS,
    DeviceRepository,
    EditLogRepository,
    ExperimentRepository,
    IdBlockRepository,
    PrototypeRepository,
)
from codebook.store.transient import is_transient
from recsys.errors import NotFoundError, RecsysError, ValidationError

logger = logging.getLogger(__name__)

RefineStrategy = Literal["lock", "optimistic"]
STRATEGIES: tuple[str, ...] = ("lock", "optimistic")


class StoreBusyError(RecsysError):
    """A write kept colliding with concurrent writers and gave up; retry later.

    Retryable: the error-mapping interceptor answers it with UNAVAILABLE (a client may
    retry with back-off), not FAILED_PRECONDITION.
    """

    retryable = True


class PrototypeStore:
    """Use cases of the prototype store over one engine (thread-safe; one per process).

    Args:
        engine: from :func:`codebook.store.db.make_engine`; the schema must exist
            (:func:`codebook.store.migrate.upgrade`).
        refine_strategy: ``"lock"`` (default) or ``"optimistic"``, see the module doc.
        max_attempts: tries of a refinement before :class:`StoreBusyError`.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        refine_strategy: RefineStrategy = "lock",
        max_attempts: int = 200,
    ) -> None:
        if refine_strategy not in STRATEGIES:
            raise ValidationError(
                f"refine_strategy {refine_strategy!r} is not one of {list(STRATEGIES)}"
            )
        if max_attempts < 1:
            raise ValidationError(f"max_attempts must be >= 1, got {max_attempts}")
        self.engine = engine
        self.refine_strategy: RefineStrategy = refine_strategy
        self.max_attempts = max_attempts
        self._sessions = make_sessionmaker(engine)
        self._retries = 0
        self._retries_lock = threading.Lock()

    @classmethod
    def open(
        cls,
        url: str | URL | None = None,
        *,
        upgrade: bool = False,
        **kwargs: Any,
    ) -> PrototypeStore:
        """A store on ``url`` (default: :func:`recsys.settings.database_url`).

        ``upgrade=True`` migrates the schema to the newest revision first; otherwise a
        database that is not at it raises :class:`~codebook.store.migrate.SchemaOutOfDateError`.
        """
        from codebook.store import migrate  # alembic only when opening

        engine = make_engine(url)
        try:
            if upgrade:
                migrate.upgrade(engine)
            else:
                migrate.ensure_current(engine)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, **kwargs)

    def close(self) -> None:
        """Close the engine's pooled connections."""
        self.engine.dispose()

    def __enter__(self) -> PrototypeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def retries(self) -> int:
        """Transactions retried so far because of concurrent writers (for benchmarks)."""
        return self._retries

    @contextmanager
    def transaction(self, *, write: bool = False) -> Iterator[Session]:
        """One session in one transaction, for use cases composed from repositories::

            with store.transaction(write=True) as session:
                repo = PrototypeRepository(session)
                ...

        Commits when the block ends, rolls back on an exception. ``write=True`` takes
        SQLite's write lock at BEGIN (use it for read-modify-write work; PostgreSQL
        callers lock rows with ``repo.get(id, lock=True)``).
        """
        with self._sessions() as session, session.begin():
            if write:
                session.connection(execution_options=WRITE_TRANSACTION)
            yield session

    # ---- prototypes ---------------------------------------------------------------------
    def create_prototype(
        self,
        name: str,
        content: VersionContent,
        *,
        reason: str = "init",
        parent: VersionRef | None = None,
    ) -> PrototypeState:
        """Create prototype ``name`` with version 1. ``reason`` is "init", or "split" /
        "spawn" with ``parent`` naming the version it was derived from."""
        try:
            with self.transaction(write=True) as session:
                repo = PrototypeRepository(session)
                parent_row = repo.version(parent.prototype_id, parent.version) if parent else None
                row = repo.create(name, content, reason=reason, parent=parent_row)
                state = prototype_state(row.prototype, row)
        except IntegrityError as exc:  # a concurrent create of the same name
            raise ValidationError(f"a prototype named {name!r} already exists") from exc
        logger.info("created prototype %d %r", state.prototype_id, name)
        return state

    def seed_prototypes(
        self, prefix: str, make: Callable[[], Sequence[tuple[str, VersionContent]]]
    ) -> tuple[list[PrototypeState], bool]:
        """The prototypes named ``{prefix}-*``, creating them first if there are none.

        Exactly one of several processes that call this at once on an empty store
        (replicas starting together) calls ``make()`` and stores what it returns,
        ``(name, content)`` pairs with names ``{prefix}-...``, as version-1 ("init")
        prototypes, all in one transaction; the others wait for it and read its
        prototypes. The transaction holds a start-up lock keyed on ``prefix``
        (:func:`codebook.store.locks.exclusive`: an advisory lock on PostgreSQL, the
        write lock on SQLite) from before its check until its commit, so no caller sees
        an empty store that another is filling, nor a half-filled one. ``make`` runs
        under that lock (keep it short); it may run again if the transaction hits a
        transient error. Returns (the prototypes at their current versions by id,
        whether this call created them).
        """
        check_name("prototype name prefix", prefix)
        key = lock_key(f"seed prototypes {prefix}")
        return retry_startup(
            functools.partial(self._seed_once, f"{prefix}-", key, make),
            what=f"seeding prototypes {prefix}-*",
        )

    def _seed_once(
        self, prefix: str, key: int, make: Callable[[], Sequence[tuple[str, VersionContent]]]
    ) -> tuple[list[PrototypeState], bool]:
        with self.transaction(write=True) as session:
            exclusive(session.connection(), key)
            repo = PrototypeRepository(session)
            existing = repo.named(prefix)
            if existing:
                return [prototype_state(p, repo.version(p.id)) for p in existing], False
            items = list(make())
            if not items:
                raise ValidationError(f"make() returned no prototypes to seed {prefix}*")
            states = []
            for name, content in items:
                if not name.startswith(prefix):
                    raise ValidationError(f"seeded prototype {name!r} is not named {prefix}*")
                row = repo.create(name, content, reason="init")
                states.append(prototype_state(row.prototype, row))
        logger.info("seeded %d prototypes %s*", len(states), prefix)
        return states, True

    def refine_prototype(
        self,
        prototype_id: int,
        update: UpdateFn,
        *,
        reason: str = "refine",
        strategy: RefineStrategy | None = None,
    ) -> PrototypeState:
        """Append a version computed by ``update(latest_state)``; returns the new state.

        No update is lost when many threads or processes refine the same prototype. An
        exception from ``update`` propagates after the transaction rolls back.
        """
        strategy = strategy or self.refine_strategy
        if strategy not in STRATEGIES:
            raise ValidationError(f"strategy {strategy!r} is not one of {list(STRATEGIES)}")
        retrying = Retrying(
            stop=stop_after_attempt(self.max_attempts),
            # full jitter: uniform(0, min(50 ms, 2 ms * 2 ** (attempt - 1)))
            wait=wait_random_exponential(multiplier=0.002, max=0.05),
            retry=retry_if_exception(lambda exc: is_transient(exc, unique_conflicts=True)),
            before_sleep=functools.partial(self._note_retry, prototype_id),
        )
        try:
            return retrying(self._refine_once, prototype_id, update, reason, strategy == "lock")
        except RetryError as err:
            raise StoreBusyError(
                f"refining prototype {prototype_id} collided with other writers "
                f"{self.max_attempts} times; retry later or use strategy='lock'"
            ) from err.last_attempt.exception()

    def _refine_once(
        self, prototype_id: int, update: UpdateFn, reason: str, pessimistic: bool
    ) -> PrototypeState:
        """One refinement transaction (see the module doc for the two strategies)."""
        with self.transaction(write=pessimistic) as session:
            repo = PrototypeRepository(session)
            proto = repo.get(prototype_id, lock=pessimistic)
            latest = repo.version(prototype_id, proto.current_version)
            content = update(prototype_state(proto, latest))
            if not isinstance(content, VersionContent):
                raise ValidationError(
                    "the update function must return a VersionContent, got "
                    f"{type(content).__name__}"
                )
            row = repo.append(proto, latest, content, reason=reason, expect_current=not pessimistic)
            return prototype_state(proto, row)

    def _note_retry(self, prototype_id: int, state: RetryCallState) -> None:
        """tenacity's ``before_sleep``: count the retry and log it."""
        with self._retries_lock:
            self._retries += 1
        logger.warning(
            "refine of prototype %d: attempt %d collided with another writer (%s); "
            "retrying in %.1f ms",
            prototype_id,
            state.attempt_number,
            state.outcome.exception() if state.outcome else None,
            1000 * (state.next_action.sleep if state.next_action else 0.0),
        )

    def get_prototype(self, prototype_id: int, version: int | None = None) -> PrototypeState:
        """A prototype's current version, or the given ``version``."""
        with self.transaction(write=False) as session:
            repo = PrototypeRepository(session)
            proto = repo.get(prototype_id)
            return prototype_state(proto, repo.version(prototype_id, version))

    def find_prototype(self, name: str) -> PrototypeInfo | None:
        """The prototype called ``name``, or None."""
        with self.transaction(write=False) as session:
            proto = PrototypeRepository(session).find(name)
            return prototype_info(proto) if proto is not None else None

    def list_prototypes(self) -> list[PrototypeInfo]:
        """All prototypes by id, without arrays."""
        with self.transaction(write=False) as session:
            return [prototype_info(p) for p in PrototypeRepository(session).list()]

    def changes_since(self, prototype_id: int, version: int) -> list[PrototypeState]:
        """The versions after ``version`` (oldest first); [] when ``version`` is current."""
        if version < 0:
            raise ValidationError(f"version must be >= 0, got {version}")
        with self.transaction(write=False) as session:
            repo = PrototypeRepository(session)
            proto = repo.get(prototype_id)
            return [
                prototype_state(proto, row) for row in repo.versions_after(prototype_id, version)
            ]

    def count_versions(self, prototype_id: int) -> int:
        """Stored versions of a prototype."""
        with self.transaction(write=False) as session:
            repo = PrototypeRepository(session)
            repo.get(prototype_id)
            return repo.count_versions(prototype_id)

    # ---- devices ------------------------------------------------------------------------
    def assign_device(
        self, device_id: str, prototype_id: int, *, seen_version: int | None = None
    ) -> DeviceAssignmentRecord:
        """Put a device in a prototype (replacing any earlier assignment)."""
        with self.transaction(write=True) as session:
            return device_record(
                DeviceRepository(session).assign(device_id, prototype_id, seen_version)
            )

    def get_device_assignment(self, device_id: str) -> DeviceAssignmentRecord:
        with self.transaction(write=False) as session:
            return device_record(DeviceRepository(session).get(device_id))

    def mark_device_seen(self, device_id: str, version: int) -> DeviceAssignmentRecord:
        """Record that the device now runs ``version`` of its prototype."""
        with self.transaction(write=True) as session:
            return device_record(DeviceRepository(session).mark_seen(device_id, version))

    def updates_for_device(self, device_id: str) -> list[PrototypeState]:
        """Versions of the device's prototype newer than the one it last saw."""
        with self.transaction(write=False) as session:
            assignment = DeviceRepository(session).get(device_id)
            repo = PrototypeRepository(session)
            proto = repo.get(assignment.prototype_id)
            rows = repo.versions_after(proto.id, assignment.seen_version or 0)
            return [prototype_state(proto, row) for row in rows]

    # ---- edit log -----------------------------------------------------------------------
    def log_edit(
        self,
        *,
        device_id: str,
        tokens: str,
        prototype_id: int | None,
        prototype_version: int | None,
        edit_norm: float,
        payload_bytes: int,
        latency_ms: float,
    ) -> EditRecord:
        """Append an audit record of a generated edit."""
        with self.transaction(write=True) as session:
            row = EditLogRepository(session).add(
                device_id=device_id,
                tokens=tokens,
                prototype_id=prototype_id,
                prototype_version=prototype_version,
                edit_norm=edit_norm,
                payload_bytes=payload_bytes,
                latency_ms=latency_ms,
            )
            return edit_record(row)

    def reserve_ids(self, count: int, *, above: int = 0, name: str = EDIT_LOG_IDS) -> range:
        """``count`` new edit-log ids (all > ``above`` and > any id reserved or written
        before), for rows written later by a write-behind writer."""
        with self.transaction(write=True) as session:
            first, last = IdBlockRepository(session).reserve(name, count, above=above)
        return range(first, last + 1)

    def edits_for_device(self, device_id: str, limit: int = 100) -> list[EditRecord]:
        """The device's latest edits, newest first."""
        with self.transaction(write=False) as session:
            return [edit_record(r) for r in EditLogRepository(session).for_device(device_id, limit)]

    # ---- experiments --------------------------------------------------------------------
    def create_experiment(
        self,
        name: str,
        salt: str,
        config: Mapping[str, Any] | None = None,
        *,
        exist_ok: bool = False,
    ) -> ExperimentRecord:
        """Create an experiment. With ``exist_ok``, an existing one with the same salt and
        config is returned instead (a different one is a :class:`ValidationError`)."""
        config = dict(config or {})
        try:
            with self.transaction(write=True) as session:
                repo = ExperimentRepository(session)
                existing = repo.find(name)
                if existing is not None and exist_ok:
                    if existing.salt != salt or existing.config != config:
                        raise ValidationError(
                            f"experiment {name!r} exists with a different salt or config; "
                            "choose a new name"
                        )
                    return experiment_record(existing)
                return experiment_record(repo.create(name, salt, config))
        except IntegrityError as exc:
            if exist_ok:
                return self.create_experiment(name, salt, config, exist_ok=True)
            raise ValidationError(f"an experiment named {name!r} already exists") from exc

    def get_experiment(self, name: str) -> ExperimentRecord:
        with self.transaction(write=False) as session:
            row = ExperimentRepository(session).find(name)
            if row is None:
                raise NotFoundError(f"no experiment named {name!r}")
            return experiment_record(row)

    def get_or_create_arm(self, experiment_id: int, user_id: str, arm: str) -> ArmAssignmentRecord:
        """The user's arm in the experiment; ``arm`` is stored only if the user has none
        yet (idempotent and race-safe: concurrent callers all get the first stored arm)."""
        retrying = Retrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=wait_random_exponential(multiplier=0.002, max=0.05),
            retry=retry_if_exception(is_transient),  # a lock wait past the busy timeout
        )
        try:
            return retrying(self._get_or_create_arm_once, experiment_id, user_id, arm)
        except RetryError as err:
            raise StoreBusyError(
                f"assigning an arm to a user of experiment {experiment_id} collided with "
                f"other writers {self.max_attempts} times; retry later"
            ) from err.last_attempt.exception()

    def _get_or_create_arm_once(
        self, experiment_id: int, user_id: str, arm: str
    ) -> ArmAssignmentRecord:
        with self.transaction(write=True) as session:
            row, created = ExperimentRepository(session).get_or_create_arm(
                experiment_id, user_id, arm
            )
            return arm_record(row, created)

    def arm_counts(self, experiment_id: int) -> dict[str, int]:
        """Users per arm of an experiment."""
        with self.transaction(write=False) as session:
            return ExperimentRepository(session).arm_counts(experiment_id)
