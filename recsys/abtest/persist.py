"""Persist an experiment and its user -> arm assignments in the prototype store.

The arm is computed by the hash (:mod:`recsys.abtest.assignment`) and then stored with the
store's idempotent, race-safe ``get_or_create_arm``: the first stored arm wins, so a user
keeps their arm across runs, processes and replicas sharing the store. An existing
experiment with the same name must have the same salt and config
(``create_experiment(exist_ok=True)`` with :func:`stored_config`); an edited config is a
:class:`~recsys.errors.ValidationError` asking for a new name.

Example::

    with PrototypeStore.open("sqlite:///out/assignments.sqlite", upgrade=True) as store:
        arms = persist_assignments(store, exp, ["1", "2", "3"])   # {'1': 'static', ...}
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from codebook.store import PrototypeStore
from codebook.store.repository import ExperimentRepository
from recsys.abtest.assignment import assign_arms
from recsys.abtest.experiment import Experiment

_CHUNK = 500  # assignments per transaction (one SQLite write lock per chunk)


def stored_config(exp: Experiment) -> dict:
    """The config stored with the experiment (every writer of one store must use this, so
    ``create_experiment(exist_ok=True)`` finds the same config); JSON round-tripped because
    the store compares it after it went through the JSON column."""
    return json.loads(json.dumps(exp.to_dict()))


def persist_assignments(
    store: PrototypeStore, exp: Experiment, user_ids: Sequence[str]
) -> dict[str, str]:
    """Create (or find) the experiment and store every user's arm; returns user -> arm.

    The returned arm is the stored one: for a user assigned before, it is the arm they got
    then, whatever the hash says now.
    """
    record = store.create_experiment(exp.name, exp.salt, stored_config(exp), exist_ok=True)
    idx = assign_arms(exp.salt, user_ids, exp.arm_pairs)
    names = [a.name for a in exp.arms]
    out: dict[str, str] = {}
    for start in range(0, len(user_ids), _CHUNK):
        with store.transaction(write=True) as session:
            repo = ExperimentRepository(session)
            for u, i in zip(
                user_ids[start : start + _CHUNK], idx[start : start + _CHUNK], strict=True
            ):
                row, _ = repo.get_or_create_arm(record.id, str(u), names[int(i)])
                out[str(u)] = row.arm
    return out


def stored_arm_counts(store: PrototypeStore, exp: Experiment) -> dict[str, int]:
    """Users per arm as persisted (for the sample-ratio check)."""
    return store.arm_counts(store.get_experiment(exp.name).id)
