"""The per-device replay on Ray (``recsys replay --ray [ADDRESS|local]``; extra ``[ray]``).

Devices are independent in the per-device replay, so a Ray cluster takes the place of the
spawned worker processes of :func:`recsys.replay.replayer.replay_devices` one for one:

* the same fixed blocks of ``cfg.chunk_users`` devices, in order;
* ``cfg.workers`` Ray actors (one CPU and one torch thread each), each building one
  :class:`~recsys.replay.replayer.Replayer` once, as a spawned worker's initialiser does;
* blocks handed to whichever actor is free (``ray.util.ActorPool``), results collected in
  block order.

A device's result depends on nothing but the device, so the results equal the spawned
workers' (and one process's) exactly.

Address: ``local`` starts a Ray instance on this machine (``cfg.workers`` CPUs), anything
else is passed to ``ray.init(address=...)`` (``auto``, ``HOST:6379``,
``ray://HOST:10001``). If this process is already connected to Ray (``ray.init`` called
by the caller, e.g. a test), that connection is used and left open. Every node needs the
project installed and the artefacts at the same paths (the cache directory on a shared
filesystem).

Example::

    cfg = ReplayConfig(workers=8, ray="auto")     # on a cluster's head node
    results = replay_devices(args, events)       # -> replay_on_ray(...)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from recsys.errors import RecsysError
from recsys.replay.records import UserResult
from recsys.replay.stream import UserEvents

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e .[ray]"


def import_ray() -> Any:
    """The ``ray`` module, or a clear error naming the extra to install."""
    try:
        import ray
    except ImportError as exc:
        raise RecsysError(
            f"the Ray replay backend needs Ray, which is not installed: {INSTALL_HINT}"
        ) from exc
    return ray


class ChunkWorker:
    """A Ray actor's body: one :class:`Replayer`, built once; blocks of devices in turn."""

    def __init__(self, args: tuple) -> None:
        from recsys.replay.replayer import Replayer

        torch.set_num_threads(1)
        self.replayer = Replayer(*args)

    def run(self, chunk: list[UserEvents]) -> list[UserResult]:
        return [self.replayer.replay_user(ev) for ev in chunk]

    def close(self) -> None:
        self.replayer.close()


def connect(address: str, cpus: int) -> bool:
    """Connect to Ray unless already connected; True if this call did (so it shuts down)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.WARNING,
    }
    if address == "local":
        ray.init(num_cpus=cpus, **kwargs)
    else:
        ray.init(address=address, **kwargs)
    return True


def replay_on_ray(
    args: tuple,
    chunks: list[list[UserEvents]],
    *,
    address: str,
    workers: int,
    on_done: Callable[[int], None] | None = None,
) -> list[UserResult]:
    """Every block of ``chunks`` through ``workers`` Ray actors; results in block order.

    Args:
        args: :data:`recsys.replay.replayer.ReplayerArgs` (each actor builds a Replayer).
        chunks: blocks of devices (``cfg.chunk_users`` each, in order).
        address: ``local`` or a Ray address (see the module docstring).
        workers: actors (one CPU each).
        on_done: called with the number of devices of each finished block (progress).
    """
    ray = import_ray()
    from ray.util import ActorPool

    workers = max(1, min(workers, len(chunks)))
    started = connect(address, workers)
    try:
        actor = ray.remote(num_cpus=1)(ChunkWorker)
        actors = [actor.remote(args) for _ in range(workers)]
        pool = ActorPool(actors)
        results: list[UserResult] = []
        try:
            for part in pool.map(lambda a, chunk: a.run.remote(chunk), chunks):
                results.extend(part)
                if on_done is not None:
                    on_done(len(part))
        finally:
            try:
                ray.get([a.close.remote() for a in actors])
            except ray.exceptions.RayError as exc:  # a failed actor: keep the first error
                logger.warning("closing the Ray replay actors: %s", exc)
            for a in actors:
                ray.kill(a)
        return results
    finally:
        if started:
            ray.shutdown()
