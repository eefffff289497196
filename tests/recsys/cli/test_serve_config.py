"""``recsys serve cloud|device --config FILE.toml`` (recsys.cli.config_file): every flag is
representable in the file and means the same there, flags override the file, the file
overrides the defaults, and a bad file is one line naming the file and the key, exit 2."""

from __future__ import annotations

import argparse
import json
import socket
import urllib.request
from pathlib import Path

import pytest

from recsys.cli import build_parser, main
from recsys.cli.config_file import option_key, read_config
from recsys.serving.process import ServerProcess

COMMANDS = ("cloud", "device")
EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def serve_parser(name: str) -> argparse.ArgumentParser:
    top = build_parser()
    groups = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    serve = groups.choices["serve"]
    commands = next(a for a in serve._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


def toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    return json.dumps(value)


def sample(action: argparse.Action) -> tuple[list[str], object]:
    """A value other than the default for one option: (its flag argv, its TOML value)."""
    flag = next(o for o in action.option_strings if o.startswith("--"))
    if isinstance(action, argparse._StoreTrueAction):
        return [flag], True
    if isinstance(action, argparse._AppendAction):
        return [flag, "a.key", flag, "b.key"], ["a.key", "b.key"]
    if action.choices is not None:
        value = next(c for c in reversed(list(action.choices)) if c != action.default)
        return [flag, str(value)], value
    if action.type is int:
        value = (action.default or 0) + 7
        return [flag, str(value)], value
    if action.type is float:
        value = (action.default or 0.0) * 0.5 + 0.25
        return [flag, repr(value)], value
    return [flag, "some-value"], "some-value"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_flag_means_the_same_in_the_file(name: str, tmp_path: Path) -> None:
    actions = [a for a in serve_parser(name)._actions if option_key(a) is not None]
    assert len(actions) > 20  # the serve commands' options, not an empty list
    parser = build_parser()  # parsing keeps no state: one parser for every case
    default = parser.parse_args(["serve", name])
    for action in actions:
        argv, value = sample(action)
        path = tmp_path / f"{option_key(action)}.toml"
        path.write_text(f"{option_key(action)} = {toml(value)}\n")
        from_flag = parser.parse_args(["serve", name, *argv])
        from_file = parser.parse_args(["serve", name, "--config", str(path)])
        assert getattr(from_file, action.dest) == getattr(from_flag, action.dest), action.dest
        assert getattr(from_file, action.dest) != getattr(default, action.dest), action.dest


def test_flags_override_the_file_and_the_file_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "cloud.toml"
    path.write_text('port = 6000\nbatch_max = 8\nauth_key = ["file.key"]\nmetrics_port = 9100\n')
    args = build_parser().parse_args(["serve", "cloud", "--config", str(path)])
    assert (args.port, args.batch_max, args.auth_key, args.metrics_port) == (
        6000, 8, ["file.key"], 9100,
    )  # fmt: skip
    assert args.batch_wait_ms == 5.0  # not in the file: the default
    # a flag wins even when it repeats its default, wherever it stands
    args = build_parser().parse_args(
        ["serve", "cloud", "--port", "50051", "--config", str(path), "--auth-key", "cli.key"]
    )
    assert (args.port, args.batch_max, args.auth_key) == (50051, 8, ["cli.key"])


def test_read_config_by_dest_and_negative_switches(tmp_path: Path) -> None:
    path = tmp_path / "device.toml"
    path.write_text('ann = "off"\nno_state = true\ncloud = "127.0.0.1:1"\n')
    values = read_config(path, serve_parser("device"))
    assert values == {"ann_mode": "off", "no_state": True, "cloud": "127.0.0.1:1"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prot = 6000\n", "cloud.toml: prot: Extra inputs are not permitted (got 6000)"),
        ('batch_max = "32"\n', "cloud.toml: batch_max: Input should be a valid integer"),
        ("batch_max = 3.5\n", "cloud.toml: batch_max: Input should be a valid integer"),
        ("no_write_behind = 1\n", "cloud.toml: no_write_behind: Input should be a valid boolean"),
        ('engine = "huge"\n', "cloud.toml: engine: Input should be 'artifacts' or 'tiny'"),
        ('auth_key = "one.key"\n', "cloud.toml: auth_key: Input should be a valid list"),
        ("ann = 'on'\n", "cloud.toml: ann: Extra inputs are not permitted"),  # a device flag
        ("port = \n", "cloud.toml: invalid TOML"),
    ],
)
def test_bad_files_name_the_file_and_the_key(text, message, tmp_path: Path, capsys) -> None:
    path = tmp_path / "cloud.toml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exc:
        main(["serve", "cloud", "--config", str(path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err and message.split(": ", 1)[1] in err


def test_missing_file_exits_2(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "device", "--config", str(tmp_path / "nope.toml")])
    assert exc.value.code == 2
    assert "nope.toml: config file not found" in capsys.readouterr().err


def test_range_errors_come_from_the_config_classes(tmp_path: Path, capsys) -> None:
    """A well-typed value outside a range reaches the service's validated config, which
    refuses it as it refuses the flag (exit 2, before anything starts)."""
    path = tmp_path / "cloud.toml"
    path.write_text('engine = "tiny"\ndataset = "ml-100k"\nmetrics_port = 70000\n')
    assert main(["serve", "cloud", "--config", str(path)]) == 2
    assert "metrics_port" in capsys.readouterr().err


@pytest.mark.parametrize("name", COMMANDS)
def test_example_configs_are_valid(name: str) -> None:
    path = EXAMPLES / f"{name}.toml"
    values = read_config(path, serve_parser(name))
    assert values["metrics_port"] and values["port"]
    args = build_parser().parse_args(["serve", name, "--config", str(path), "--port", "0"])
    assert args.port == 0 and args.metrics_port == values["metrics_port"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_cloud_process_from_a_config_file_serves_metrics_and_traces(tmp_path: Path) -> None:
    """``recsys serve cloud --config FILE`` in a child process: the file's engine, metrics
    port and console tracing are used, the command line's --port 0 overrides its port."""
    import pandas as pd
    from prometheus_client.parser import text_string_to_metric_families

    from recsys.data import Dataset, write_dataset

    items = [f"i{n}" for n in range(12)]
    inter = pd.DataFrame({"user_id": ["u0", "u1"] * 6, "item_id": items, "timestamp": range(12)})
    ds = write_dataset(Dataset("cat", pd.DataFrame({"item_id": items}), inter), tmp_path / "cat")
    metrics_port = _free_port()
    cfg = tmp_path / "cloud.toml"
    cfg.write_text(
        f'engine = "tiny"\ndataset = {json.dumps(str(ds))}\nhead_spec = "fc0=16x8,fc1=8x16"\n'
        f'port = 1\nmetrics_port = {metrics_port}\ntrace = "console"\n'
    )
    log = tmp_path / "cloud.log"
    with ServerProcess(
        ["serve", "cloud", "--config", str(cfg)], name="cloud-cfg", log_path=log
    ) as cloud:
        cloud.wait_ready(timeout=120)  # health checks: traced and counted
        assert cloud.port != 1
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        checks = [
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "recsys_rpc_requests_total" and s.labels["method"] == "Check"
        ]
        assert checks and sum(checks) >= 1
    assert '"name": "grpc.health.v1.Health/Check"' in log.read_text()  # --trace console
