"""The replay core: every policy on the same stream, in process or through the services.

One entry point, :func:`recsys.replay.engine.run_replay` (``via="inprocess" | "grpc"``),
called by ``recsys replay``, ``recsys eval adaptor`` (:mod:`recsys.replay.adaptor_eval`),
the parity and live A/B modes, the A/B harness and the demo. Shared parts:

* :mod:`recsys.replay.config`: :class:`ReplayConfig` (the protocol), :class:`PolicySpec`,
  :class:`GrpcOptions`.
* :mod:`recsys.replay.stream`: :func:`build_stream`, the events, histories and negatives.
* :mod:`recsys.replay.gate_calibration`: the gate threshold per budget, from the training period.
* :mod:`recsys.replay.policies`: request points of the gate and the timer.
* :mod:`recsys.replay.records` / :mod:`recsys.replay.costs`: per-event results, the
  per-device :class:`UserResult` both drivers return, costs.
* :mod:`recsys.replay.report` / :mod:`recsys.replay.plots`: tables, ``results.json``,
  ``results.md``, ``per_user.json``, PNG plots.
* :mod:`recsys.replay.compare`: one policy across the runs of several artefacts (e.g.
  the token-source ablation), paired user by user (``recsys replay compare``).

Drivers:

* in process: :mod:`recsys.replay.replayer` (one device through every policy, batched)
  with :mod:`recsys.replay.edits` (system / DUET / fine-tuning edits);
* through the real services: :mod:`recsys.replay.grpc_driver` (async per-user driver)
  with :mod:`recsys.replay.services` (server command lines, start / stop);
  :mod:`recsys.replay.parity` compares the two, :mod:`recsys.replay.live` sends live A/B
  traffic through one device serving an experiment.

The names below are the replay's public surface: the A/B harness (and anything else
outside ``recsys.replay`` but the CLI) imports only these (an import-linter contract).
``run_replay`` is loaded on first use, so importing the package stays light.
"""

from recsys.replay.config import GrpcOptions, PolicySpec, ReplayConfig, default_policies
from recsys.replay.records import EventRecords, UserResult


def __getattr__(name: str):  # PEP 562: the engine (torch, the drivers) on first use
    if name == "run_replay":
        from recsys.replay.engine import run_replay

        return run_replay
    raise AttributeError(f"module 'recsys.replay' has no attribute {name!r}")


__all__ = [
    "EventRecords",
    "GrpcOptions",
    "PolicySpec",
    "ReplayConfig",
    "UserResult",
    "default_policies",
    "run_replay",
]
