"""Offline replay evaluation (``recsys replay``): every policy on the same stream.

* :mod:`recsys.replay.config`: :class:`ReplayConfig` (the protocol), :class:`PolicySpec`.
* :mod:`recsys.replay.stream`: :func:`build_stream`, the events, histories and negatives.
* :mod:`recsys.replay.gate_calibration`: the gate threshold per budget, from the training period.
* :mod:`recsys.replay.policies`: request points of the gate and the timer.
* :mod:`recsys.replay.replayer`: one device through every policy (edits, batched scoring).
* :mod:`recsys.replay.engine`: :func:`run_replay` in process (:class:`ReplayRun`), workers.
* :mod:`recsys.replay.records` / :mod:`recsys.replay.costs`: per-event results, costs.
* :mod:`recsys.replay.report` / :mod:`recsys.replay.plots`: tables, ``results.json``,
  ``results.md``, PNG plots.
* :mod:`recsys.replay.grpc_driver`: the same replay through the gRPC services.

Heavy modules (engine, report) are imported where used.
"""

from recsys.replay.config import PolicySpec, ReplayConfig, default_policies
from recsys.replay.records import EventRecords

__all__ = ["EventRecords", "PolicySpec", "ReplayConfig", "default_policies"]
