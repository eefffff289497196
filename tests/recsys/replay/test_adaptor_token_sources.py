"""The adaptor's token sources for the issue-14 ablation: ``none`` (the summary-only
adaptor: its token path pools to exactly zero) trains and replays, uplinking no items;
the LM directory of ``--tokens lm`` (``--lm DIR``) is recorded in the artefact (relative
to the cache dir when inside it) and used by the replay; an artefact written beside the
default one keeps its own prototype store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from tiny_world import tiny_adaptor_config

import llm_cloud.backends as backends
from codebook.adaptor import Adaptor, AdaptorConfig
from codebook.adaptor_artifact import artifact_lm_dir, lm_dir_record, load_artifact
from codebook.prototypes import PrototypeConfig
from codebook.semantic_ids import SemanticIdMap
from recsys.cli import main
from recsys.errors import ValidationError
from recsys.replay.config import PolicySpec, ReplayConfig
from recsys.replay.costs import FLOAT_BYTES, ID_BYTES, PROTOTYPE_REF_BYTES
from recsys.replay.engine import run_replay
from recsys.replay.services import _cloud_argv
from recsys.workflows.adaptor_config import AdaptorTrainConfig
from recsys.workflows.adaptor_data import resolve_token_source
from recsys.workflows.adaptor_training import default_store_path, train_adaptor

POLICIES = [
    PolicySpec("static"),
    PolicySpec("system", "timer", 0.5),
    PolicySpec("duet", "timer", 0.5),
]


def world_config(**overrides) -> AdaptorTrainConfig:
    """The replay world's adaptor config (tests/recsys/replay/replay_world.py)."""
    return tiny_adaptor_config(
        epochs=3,
        bound_fraction=20.0,
        bias_fraction=4.0,
        prototypes=PrototypeConfig(num_prototypes=3, residual_rank=2),
        **overrides,
    )


class FakeLM:
    """The llm_cloud backend interface; answers each history's last item and the next."""

    made: ClassVar[list[Path]] = []

    def __init__(self, name, model_dir, config=None, **options) -> None:
        FakeLM.made.append(Path(model_dir))

    def generate(self, histories, top_n):
        return [[(h[-1] % 30, -0.1), ((h[-1] + 1) % 30, -1.0)] if h else [] for h in histories]

    def close(self) -> None:
        pass


@pytest.fixture
def fake_lm(monkeypatch):
    FakeLM.made = []
    monkeypatch.setattr(backends, "make_backend", FakeLM)
    return FakeLM


def make_lm_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "recsys_lm.json").write_text("{}")
    return path


def test_no_tokens_pool_to_zero_and_leave_the_summary_alone() -> None:
    ids = SemanticIdMap.from_codes(np.stack([np.arange(30) % 5, np.arange(30) // 5 % 4], 1), [5, 4])
    tokens = resolve_token_source("none", ids, 5, None)
    codes, scores = tokens([np.array([1, 2, 3]), np.array([], dtype=np.int64)])
    assert tokens.name == "none" and scores is None
    assert codes.shape == (2, 5, ids.num_levels) and (codes == -1).all()
    torch.manual_seed(0)
    adaptor = Adaptor(
        AdaptorConfig(vocab_sizes=tuple(ids.vocab_sizes), head_spec={"fc0": (8, 8)}, summary_dim=6,
                      max_items=5, token_dim=4, code_dim=4, hidden=8, rank=2, dropout=0.0)
    )  # fmt: skip
    summary = torch.randn(2, 6)
    code = adaptor.encode(torch.from_numpy(codes), None, summary)
    assert torch.allclose(code, adaptor.context(torch.zeros(2, 4), summary))
    code.sum().backward()
    assert float(adaptor.code_embedding.weight.grad.abs().sum()) == 0.0  # no signal reaches it
    assert adaptor.context.summary.weight.grad.abs().sum() > 0


def test_none_needs_the_summary(world, tmp_path: Path, capsys) -> None:
    with pytest.raises(ValidationError, match="no input at all"):
        AdaptorTrainConfig(token_source="none", device_summary=False)
    common = ["train", "adaptor", "--dataset", str(world.root), "--cache-dir", str(world.cache),
              "--artifact", str(tmp_path / "a.pt"), "--no-progress"]  # fmt: skip
    for extra, message in (
        (["--tokens", "none", "--no-summary"], "--tokens none --no-summary"),
        (["--tokens", "recent", "--lm", str(tmp_path)], "--lm names the LM"),
    ):
        assert main([*common, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "a.pt").exists()


def test_none_trains_and_replays_in_process_only(world) -> None:
    adaptor_dir = world.cache / "artifacts" / world.ds.name / "adaptor"
    default_store = adaptor_dir / "prototypes.sqlite"
    before = default_store.read_bytes()
    path = adaptor_dir / "adaptor-none.pt"
    res = train_adaptor(
        world_config(token_source="none"), world.ds, cache=world.cache, artifact_path=path,
        progress=False,
    )  # fmt: skip
    # the default adaptor's prototypes are untouched; this one has its own store
    assert default_store.read_bytes() == before
    assert default_store_path(path) == adaptor_dir / "adaptor-none.prototypes.sqlite"
    assert res.store_url == f"sqlite:///{default_store_path(path)}"
    assert default_store_path(path).is_file()
    art = load_artifact(path)
    assert art["token_source"] == "none" and art["lm_dir"] is None
    assert art["adaptor_config"]["summary_dim"] > 0

    cfg = ReplayConfig(artifact=str(path), negatives=5, max_users=12)
    run = run_replay(world.ds, cfg, POLICIES, cache=world.cache, progress=False)
    assert run.meta["token_source"] == "none" and run.meta["lm_dir"] is None
    sys_rec, static = run.records["system timer 50%"], run.records["static"]
    assert len(sys_rec) == len(static) > 0
    assert not np.array_equal(sys_rec.rank, static.rank)  # the summary-only edits act
    summary_bytes = FLOAT_BYTES * 2 * 8  # S = 2D, D = 8
    sys_cost, duet_cost = run.costs["system timer 50%"], run.costs["duet timer 50%"]
    assert sys_cost["uplink_bytes_per_request"] == summary_bytes + PROTOTYPE_REF_BYTES
    assert duet_cost["uplink_bytes_per_request"] >= summary_bytes + ID_BYTES * 3
    with pytest.raises(ValidationError, match="token source none"):
        run_replay(world.ds, cfg, [PolicySpec("static")], cache=world.cache, via="grpc",
                   progress=False)  # fmt: skip


def test_lm_dir_round_trips_and_the_replay_uses_it(world, tmp_path: Path, fake_lm) -> None:
    cache, name = world.cache, world.ds.name
    inside = make_lm_dir(cache / "artifacts" / name / "llm-fake")
    outside = make_lm_dir(tmp_path / "elsewhere" / "llm")
    assert lm_dir_record(inside, cache) == f"artifacts/{name}/llm-fake"
    assert lm_dir_record(outside, cache) == str(outside.resolve())
    # artefacts saved before the LM directory was recorded read the default one
    assert artifact_lm_dir({"token_source": "lm"}, cache, name) == cache / "artifacts" / name / "lm"
    # a moved cache keeps the relative record
    moved = artifact_lm_dir({"lm_dir": f"artifacts/{name}/llm-fake"}, tmp_path / "c2", name)
    assert moved == tmp_path / "c2" / "artifacts" / name / "llm-fake"

    path = tmp_path / "adaptor-llm.pt"
    train_adaptor(
        world_config(token_source="lm"), world.ds, cache=cache, lm_dir=inside,
        artifact_path=path, progress=False,
    )  # fmt: skip
    assert fake_lm.made == [inside]
    art = load_artifact(path)
    assert art["token_source"] == "lm" and art["lm_dir"] == f"artifacts/{name}/llm-fake"
    assert (tmp_path / "adaptor-llm.prototypes.sqlite").is_file()

    fake_lm.made = []
    cfg = ReplayConfig(artifact=str(path), negatives=5, max_users=6)
    run = run_replay(world.ds, cfg, POLICIES[:2], cache=cache, progress=False)
    assert fake_lm.made == [cache / "artifacts" / name / "llm-fake"]
    assert run.meta["token_source"] == "lm"
    assert run.meta["lm_dir"] == f"CACHE/artifacts/{name}/llm-fake"
    argv = _cloud_argv(path, art, cache, name)  # the gRPC replay's cloud server too
    assert argv[argv.index("--lm-dir") + 1] == str(inside)
    shutil.rmtree(inside)  # the shared world's cache keeps no LM


def test_cli_train_adaptor_with_an_lm_dir(world, tmp_path: Path, fake_lm, capsys) -> None:
    lm = make_lm_dir(tmp_path / "pretrained-llm")
    path = tmp_path / "out" / "adaptor.pt"
    rc = main(
        ["train", "adaptor", "--dataset", str(world.root), "--cache-dir", str(world.cache),
         "--lm", str(lm), "--artifact", str(path), "--epochs", "1", "--window", "3",
         "--prototypes", "3", "--rank", "2", "--no-progress", "--json", str(tmp_path / "t.json")]
    )  # fmt: skip
    assert rc == 0
    assert f"tokens: lm from {lm.resolve()}" in capsys.readouterr().out
    out = json.loads((tmp_path / "t.json").read_text())
    assert out["token_source"] == "lm" and out["config"]["token_source"] == "lm"
    assert out["lm_dir"] == str(lm.resolve()) == load_artifact(path)["lm_dir"]
    assert fake_lm.made == [lm]
    assert (path.parent / "prototypes.sqlite").is_file()


def test_cli_artefacts_share_one_store_by_name(world, tmp_path: Path, capsys) -> None:
    from codebook.store import PrototypeStore

    url = f"sqlite:///{tmp_path / 'shared.sqlite'}"
    common = ["train", "adaptor", "--dataset", str(world.root), "--cache-dir", str(world.cache),
              "--epochs", "1", "--window", "3", "--prototypes", "3", "--rank", "2",
              "--db", url, "--no-progress"]  # fmt: skip
    assert main([*common, "--artifact", str(tmp_path / "adaptor.pt"), "--tokens", "recent"]) == 0
    assert main([*common, "--artifact", str(tmp_path / "adaptor-none.pt"), "--tokens", "none"]) == 0
    art = load_artifact(tmp_path / "adaptor-none.pt")
    assert art["config"]["prototypes"]["name_prefix"] == "adaptor-none-proto"
    assert load_artifact(tmp_path / "adaptor.pt")["config"]["prototypes"]["name_prefix"] == "proto"
    with PrototypeStore.open(url) as store:
        names = sorted(p.name for p in store.list_prototypes())
    assert names == [
        *(f"adaptor-none-proto-{k}" for k in range(3)),
        *(f"proto-{k}" for k in range(3)),
    ]
    # a shared store is never emptied: training the same bank into it again is refused early
    rc = main([*common, "--artifact", str(tmp_path / "adaptor-none.pt"), "--tokens", "none"])
    assert (
        rc == 2
        and "already holds 3 prototypes named adaptor-none-proto-*" in capsys.readouterr().err
    )
