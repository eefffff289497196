"""Quiet by default at the CLI edge: third-party chatter only with -v (recsys.cli.quiet)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from recsys.cli import quiet

# a tiny canonical dataset, a one-epoch ranker (imports torchrec: fbgemm_gpu's load lines,
# torch.fx's deprecation notice) and the store's migrations (alembic's INFO lines)
SCRIPT = textwrap.dedent(
    """
    import sys
    import pandas as pd
    from recsys.cli import main
    from recsys.data import Dataset, write_dataset

    tmp, flags = sys.argv[1], sys.argv[2:]
    rows = [(f"u{u}", f"i{(u + 2 * k) % 30}", 20 * u + k) for u in range(20) for k in range(10)]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(30)]})
    data = write_dataset(Dataset("tiny", items, inter), f"{tmp}/tiny")
    assert main([*flags, "train", "ranker", "--dataset", str(data), "--cache-dir",
                 f"{tmp}/cache", "--epochs", "1", "--dim", "8", "--max-len", "5",
                 "--no-progress"]) == 0
    assert main([*flags, "db", "upgrade", "--url", f"sqlite:///{tmp}/store.sqlite"]) == 0
    """
)
NOISE = ("Successfully loaded", "Context impl", "is_fx_tracing", " INFO ")


def _run(tmp_path: Path, *flags: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in (*quiet.QUIET_ENV, "PYTHONWARNINGS")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_commands_are_quiet_by_default_and_chatty_with_v(tmp_path: Path) -> None:
    quiet_err = _run(tmp_path / "quiet")
    assert not [n for n in NOISE if n in quiet_err], quiet_err
    loud_err = _run(tmp_path / "loud", "-v")
    for needle in NOISE:
        assert needle in loud_err, needle


@pytest.fixture
def fresh() -> Iterator[None]:
    """Leave no handler, level or environment variable of these tests behind."""
    saved = {k: os.environ.get(k) for k in (*quiet.QUIET_ENV, "PYTHONWARNINGS")}
    root_level = logging.getLogger().level
    yield
    quiet.reset()
    logging.getLogger().setLevel(root_level)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _emit() -> None:
    logging.getLogger("recsys.data.registry").info("ours-info")
    logging.getLogger("recsys.data.registry").warning("ours-warning")
    logging.getLogger().info("Successfully loaded: 'x.so'")  # fbgemm_gpu logs on the root
    logging.getLogger("alembic.runtime.migration").info("Context impl SQLiteImpl.")
    logging.getLogger("recsys.serving.server").info("listening on 127.0.0.1:1")
    logging.getLogger("recsys.data.registry").debug("ours-debug")


def test_levels_per_verbosity(fresh, capsys: pytest.CaptureFixture[str]) -> None:
    quiet.configure(0)
    _emit()
    err = capsys.readouterr().err
    assert "ours-warning" in err and "listening on" in err
    assert "ours-info" not in err and "Successfully" not in err and "Context impl" not in err
    quiet.configure(1)
    _emit()
    err = capsys.readouterr().err
    assert all(s in err for s in ("ours-info", "Successfully", "Context impl", "listening"))
    assert "ours-debug" not in err
    quiet.configure(2)
    _emit()
    assert "ours-debug" in capsys.readouterr().err


def test_configure_replaces_its_handler_and_keeps_the_users_environment(
    fresh, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_LOGS", "+dynamo")
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    before = list(logging.getLogger().handlers)
    quiet.configure(0)
    quiet.configure(0)
    assert len(logging.getLogger().handlers) == len(before) + 1
    assert os.environ["TORCH_LOGS"] == "+dynamo"  # the user's choice wins
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    quiet.configure(1)  # -v: nothing exported
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ


def test_known_warnings_are_ignored_only_when_quiet(fresh) -> None:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.configure(0)
        if sys.warnoptions:
            pytest.skip("an explicit -W choice disables the filters")
        warnings.warn("`past_key_values` is deprecated and will go", FutureWarning, stacklevel=1)
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]
    entries = [k.env_entry() for k in quiet.KNOWN_WARNINGS]
    assert "ignore:`past_key_values` is deprecated:FutureWarning" in entries


def test_adopt_gives_standalone_loggers_the_third_party_threshold(fresh) -> None:
    standalone = logging.Logger("pooch-like")  # outside logging's tree, like pooch's
    quiet.configure(0)
    quiet.adopt(standalone)
    assert standalone.level == logging.WARNING
    quiet.configure(1)
    quiet.adopt(standalone)
    assert standalone.level == logging.INFO
