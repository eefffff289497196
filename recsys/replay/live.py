"""Live A/B traffic: the replay stream's users through ONE device server that serves an
experiment (``recsys replay --live-experiment FILE --event-log LOG``).

The device (``recsys serve device --experiment FILE --event-log LOG``) gives each user
its arm (hash of salt and user, persisted in a private store); a static arm never asks
the cloud, an adapted arm's gate calibrates its threshold live from its budget. The
device writes one line per event to the event log, which ``recsys abtest analyze
--events LOG`` reads. The users are driven by the gRPC replay driver
(:func:`recsys.replay.grpc_driver.drive`), as in ``recsys replay --via grpc``.

Example::

    info = run_live_experiment(ds, ReplayConfig(max_users=200), Path("exp.toml"),
                               Path("events.jsonl"), cache=settings.cache_dir())
    info["edit_requests"], info["failed_requests"]
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from recsys.data import Dataset, write_dataset
from recsys.replay.config import GrpcOptions, PolicySpec, ReplayConfig
from recsys.replay.engine import prepare_replay
from recsys.replay.grpc_driver import drive
from recsys.replay.services import cloud_argv, device_argv, display_argv, server, wait_ready

logger = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = GrpcOptions().concurrency


def run_live_experiment(
    ds: Dataset,
    cfg: ReplayConfig,
    experiment: Path,
    event_log: Path,
    *,
    cache: Path,
    users: Sequence[int] | None = None,
    progress: bool = True,
    concurrency: int = DEFAULT_CONCURRENCY,
    startup_timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Send the stream's users through one device server serving ``experiment``, with
    the cloud beside it (see the module docstring); the device writes ``event_log``.

    Returns:
        what ran: users, events, the device's request counters and the servers' argv.
    """
    options = GrpcOptions(concurrency=concurrency, startup_timeout_s=startup_timeout_s)
    spec = PolicySpec(
        kind="system", trigger="gate", budget=1.0
    )  # any requesting spec: the arms decide
    prep = prepare_replay(ds, cfg, [spec], cache=cache, users=users)
    events = prep.events()
    event_log = Path(event_log)
    event_log.unlink(missing_ok=True)
    info: dict[str, dict[str, Any]] = {"cloud": {}, "device": {}}
    with tempfile.TemporaryDirectory(prefix="recsys-live-ab-") as name:
        tmp = Path(name)
        ds_dir = Path(write_dataset(ds, tmp / "dataset"))
        cloud_args = cloud_argv(prep.art, prep.art_path, Path(cache), ds.name, tmp)
        with server(cloud_args, "cloud", tmp, info["cloud"], startup_timeout_s) as cloud:
            dev_args = [
                *device_argv(None, cfg, prep.art, ds_dir, {}, cloud.target),
                "--experiment", str(experiment), "--event-log", str(event_log),
                "--store-url", f"sqlite:///{tmp / 'assignments.sqlite'}",
            ]  # fmt: skip
            with server(dev_args, "device", tmp, info["device"], startup_timeout_s) as device:
                wait_ready(cloud, startup_timeout_s, info["cloud"])
                wait_ready(device, startup_timeout_s, info["device"])
                with tqdm(total=len(events), desc="live A/B", disable=not progress) as bar:
                    parts = asyncio.run(drive(device.target, events, ds, cfg, spec, options, bar))
                status = asyncio.run(_device_status(device.target, options.rpc_timeout_s))
        return {
            "users": len(events),
            "events": int(sum(len(e.items) for e in events)),
            "edit_requests": int(status.edit_requests),
            "edit_failures": int(status.edit_failures),
            "failed_requests": int(sum(acc.failed_requests for _, acc in parts)),
            "experiment": status.experiment,
            "servers": {
                "cloud": display_argv(cloud_args, tmp, cache),
                "device": display_argv(dev_args, tmp, cache),
            },
        }


async def _device_status(target: str, timeout_s: float) -> Any:
    from recsys.rpc.device.v1 import recommendation_pb2 as pb
    from recsys.rpc.device.v1 import recommendation_pb2_grpc as pb_grpc
    from recsys.serving.server import client_channel

    async with client_channel(target) as channel:
        return await pb_grpc.RecommendationServiceStub(channel).GetStatus(
            pb.GetStatusRequest(), timeout=timeout_s
        )


__all__ = ["run_live_experiment"]
