"""A/B test harness: experiments as config, hash assignment, replay or live runs, analysis.

Modules (one concern each):

* :mod:`recsys.abtest.experiment`: the experiment TOML file -> :class:`Experiment`.
* :mod:`recsys.abtest.assignment`: deterministic (salt, user) -> arm (pure, no project deps).
* :mod:`recsys.abtest.metrics`: the metrics an experiment may name, per-event formulas.
* :mod:`recsys.abtest.persist`: assignments in the prototype store.
* :mod:`recsys.abtest.usertable`: ``users.csv`` / ``daily.csv``, the analysis input.
* :mod:`recsys.abtest.runner`: ``abtest run`` over the replay engine.
* :mod:`recsys.abtest.eventlog`: the device service's live event log -> the same tables.
* :mod:`recsys.abtest.stats`, :mod:`.srm`, :mod:`.sequential`, :mod:`.power`: the tests.
* :mod:`recsys.abtest.analysis`: every arm vs control, verdicts; :mod:`.report`,
  :mod:`.plots`: report.md / report.json / PNGs.
* :mod:`recsys.abtest.studies`: the validation studies (A/A, planted effect, SRM, CUPED).

The package import pulls in only the first three (the device service imports them); the
others may use the replay engine and the prototype store.
"""

from recsys.abtest.assignment import assign_arm
from recsys.abtest.experiment import Arm, Experiment, load_experiment

__all__ = ["Arm", "Experiment", "assign_arm", "load_experiment"]
