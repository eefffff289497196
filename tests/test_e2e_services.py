"""End to end: the cloud and the device as REAL processes on ephemeral loopback ports.

A tiny ranker is trained here in seconds on a synthetic canonical dataset; the cloud
runs the tiny engine (untrained adaptor, prototypes in a SQLite store); both servers
require signed tokens made with `recsys auth keygen` / `recsys auth issue` (the device's
link holds an operator token: it hosts many users). The test checks the issue-16 probes
(an impersonating or unauthenticated call is rejected and changes nothing), gets
recommendations, triggers an edit through the request gate, sees
the active edit version change, kills the cloud (SIGKILL), still gets recommendations
(marked as fallback), restarts the cloud on the same port and sees the device recover;
both servers then stop gracefully on SIGTERM (exit code 0).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest

from recsys.rpc.cloud.v1 import adaptation_pb2 as cpb
from recsys.rpc.cloud.v1 import adaptation_pb2_grpc as cpb_grpc
from recsys.rpc.device.v1 import recommendation_pb2 as pb
from recsys.rpc.device.v1 import recommendation_pb2_grpc as pb_grpc
from recsys.serving.auth import token_metadata
from recsys.serving.process import ServerProcess

pytestmark = pytest.mark.slow


def tiny_artifacts(root: Path) -> tuple[Path, Path]:
    """A synthetic dataset (users walk the catalogue) and a ranker trained on it."""
    import torch

    from device_ranker.config import ModelConfig
    from device_ranker.train import TrainConfig, train
    from recsys.data import Dataset, write_dataset

    rng = np.random.default_rng(0)
    rows, t = [], 0
    for u in range(16):
        start, step = int(rng.integers(30)), 1 + u % 2
        for n in range(12):
            t += 1
            rows.append((f"u{u}", f"i{(start + step * n) % 30}", t))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).drop_duplicates(
        ["user_id", "item_id"]
    )
    ds = Dataset("e2e", pd.DataFrame({"item_id": [f"i{n}" for n in range(30)]}), inter)
    ds_dir = Path(write_dataset(ds, root / "dataset"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = TrainConfig(
        model=ModelConfig(num_items=0, dim=8, max_len=6, num_layers=1, num_heads=2, head_hidden=16),
        epochs=2,
        batch_size=8,
    )
    train(cfg, ds, checkpoint_path=root / "ranker.pt", progress=False)
    torch.set_num_threads(threads)
    return ds_dir, root / "ranker.pt"


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _issue(key: Path, device: str, tmp_path: Path) -> str:
    from recsys.cli import main

    out = tmp_path / f"{device}.token"
    assert main(["auth", "issue", "--device", device, "--key", str(key), "--out", str(out)]) == 0
    return out.read_text().strip()


def test_device_and_cloud_processes(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    ds_dir, ckpt = tiny_artifacts(tmp_path)
    from recsys.cli import main

    keys, token = tmp_path / "keys", tmp_path / "edge.token"
    assert main(["auth", "keygen", "--out", str(keys / "k1.key")]) == 0
    assert main(["auth", "issue", "--device", "edge-1", "--role", "operator",
                 "--key", str(keys / "k1.key"), "--out", str(token)]) == 0  # fmt: skip
    ops = token_metadata(token.read_text().strip())
    cloud_argv = [
        "serve", "cloud", "--engine", "tiny", "--dataset", str(ds_dir),
        "--head-spec", "fc0=16x8,fc1=8x16", "--store-url", f"sqlite:///{tmp_path / 'store.sqlite'}",
        "--auth-key", str(keys), "--batch-wait-ms", "2",
    ]  # fmt: skip
    cloud = ServerProcess(cloud_argv, name="cloud", log_path=tmp_path / "cloud.log").start()
    device = None
    try:
        cloud_port = cloud.wait_ready(timeout=120)
        device = ServerProcess(
            ["serve", "device", "--checkpoint", str(ckpt), "--dataset", str(ds_dir),
             "--cloud", cloud.target, "--cloud-token-file", str(token), "--cloud-deadline", "3",
             "--probe-interval", "0.2", "--gate-min-history", "2", "--gate-min-gap", "1",
             "--gate-threshold", "0", "--gate-budget", "1", "--auth-key", str(keys)],
            name="device", log_path=tmp_path / "device.log",
        ).start()  # fmt: skip
        device.wait_ready(timeout=120)
        with grpc.insecure_channel(device.target) as channel:
            stub = pb_grpc.RecommendationServiceStub(channel)

            def status(user: str = "u0") -> pb.GetStatusResponse:
                return stub.GetStatus(pb.GetStatusRequest(user_id=user), timeout=5, metadata=ops)

            def user_state(user: str) -> tuple:
                u = status(user).user
                return u.history_length, u.mode, u.edit.SerializeToString(), u.events_since_apply

            # 0. the probes of issue 16: impersonation and no token change nothing
            before = user_state("u1")
            u0_token = _issue(keys / "k1.key", "u0", tmp_path)
            push = pb.ApplyEditRequest(user_id="u1", edit_payload=b"")
            for metadata, code in (
                ((), grpc.StatusCode.UNAUTHENTICATED),
                (token_metadata(u0_token), grpc.StatusCode.PERMISSION_DENIED),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    stub.ApplyEdit(push, timeout=5, metadata=metadata)
                assert err.value.code() == code
            assert user_state("u1") == before

            # 1. recommendations from the base model
            rec = stub.Recommend(pb.RecommendRequest(user_id="u0", k=5), timeout=5, metadata=ops)
            assert len(rec.items) == 5 and rec.mode == pb.SERVING_MODE_BASE
            assert status().cloud_reachable

            # 2. an event fires the gate; the cloud's edit becomes active
            ev = stub.RecordEvent(
                pb.RecordEventRequest(
                    user_id="u0", item_id="i7", timestamp=10**6, wait_for_edit=True
                ),
                timeout=10,
                metadata=ops,
            )
            assert ev.edit_requested and ev.outcome == pb.EDIT_OUTCOME_APPLIED
            first = status().user.edit
            assert first.edit_id >= 1 and first.prototype_id >= 1 and first.source == "cloud"
            rec = stub.Recommend(pb.RecommendRequest(user_id="u0", k=5), timeout=5, metadata=ops)
            assert rec.mode == pb.SERVING_MODE_EDITED and rec.edit.edit_id == first.edit_id

            # the cloud keeps its edit log and prototypes (and wants the token)
            with grpc.insecure_channel(cloud.target) as cch:
                cstub = cpb_grpc.AdaptationServiceStub(cch)
                with pytest.raises(grpc.RpcError) as err:
                    cstub.ListPrototypes(cpb.ListPrototypesRequest(), timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                listing = cstub.ListPrototypes(cpb.ListPrototypesRequest(), timeout=5, metadata=ops)
                assert first.prototype_id in {p.id for p in listing.prototypes}

            # 3. the cloud crashes: the device keeps serving, marked as fallback
            cloud.kill()
            wait_for(lambda: not status().cloud_reachable, 10, "the device to notice the outage")
            rec = stub.Recommend(pb.RecommendRequest(user_id="u0", k=5), timeout=5, metadata=ops)
            assert len(rec.items) == 5
            assert rec.fallback and rec.mode == pb.SERVING_MODE_FALLBACK_LAST_EDIT
            assert rec.edit.edit_id == first.edit_id and rec.note
            ev = stub.RecordEvent(
                pb.RecordEventRequest(
                    user_id="u0", item_id="i8", timestamp=10**6 + 1, wait_for_edit=True
                ),
                timeout=10,
                metadata=ops,
            )
            assert ev.outcome == pb.EDIT_OUTCOME_FAILED
            assert status().user.edit.edit_id == first.edit_id  # the last good edit stays

            # 4. the cloud comes back on the same port: the device recovers
            cloud = ServerProcess(
                cloud_argv, name="cloud", port=cloud_port, log_path=tmp_path / "cloud2.log"
            ).start()
            cloud.wait_ready(timeout=120)
            wait_for(lambda: status().cloud_reachable, 15, "the device to see the cloud again")
            ev = stub.RecordEvent(
                pb.RecordEventRequest(
                    user_id="u0", item_id="i9", timestamp=10**6 + 2, wait_for_edit=True
                ),
                timeout=10,
                metadata=ops,
            )
            assert ev.outcome == pb.EDIT_OUTCOME_APPLIED
            recovered = status()
            assert recovered.user.edit.edit_id > first.edit_id
            assert recovered.user.mode == pb.SERVING_MODE_EDITED
            rec = stub.Recommend(pb.RecommendRequest(user_id="u0", k=5), timeout=5, metadata=ops)
            assert not rec.fallback and rec.mode == pb.SERVING_MODE_EDITED
            assert recovered.edit_failures >= 1 and recovered.bytes_down > 0

        # 5. graceful shutdown on SIGTERM
        assert device.stop(timeout=30) == 0, device.log_tail()
        assert cloud.stop(timeout=30) == 0, cloud.log_tail()
        assert "shutting down" in (tmp_path / "device.log").read_text()
    finally:
        if device is not None:
            device.close()
        cloud.close()
    assert time.perf_counter() - t0 < 120
