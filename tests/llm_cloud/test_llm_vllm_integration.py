"""End to end with the real vLLM: `recsys serve llm` + the openai backend (one server).

Starts `recsys serve llm` (which starts vLLM's OpenAI-compatible server
from .venv-vllm with the trie logits processor) ONCE for this module on a tiny model
trained here on ml-100k (its 1,682 items as IDs), generates for real users' histories, checks every output is a catalogue ID and
that the top-1 equals the transformers backend's (float32 engine), then stops the CLI
with SIGTERM and checks that the server and its engine processes are gone.
Skips when .venv-vllm is missing (scripts/install_vllm.sh creates it) or the raw
ml-100k files are.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from llm_helpers import skip_module_without_vllm

from llm_cloud.backends import BackendConfig, make_backend
from llm_cloud.backends.base import Backend
from llm_cloud.server import ServerError, free_port, live_group_members, log_tail
from recsys.settings import PROJECT_ROOT

pytestmark = pytest.mark.vllm

skip_module_without_vllm()


@pytest.fixture(scope="module")
def served(
    trained_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-log") / "server.log"
    cli = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from recsys.cli import main; sys.exit(main())",
            "serve",
            "llm",
            "--model",
            str(trained_dir),
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--log",
            str(log),
        ],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    try:
        while not _healthy(url):
            if cli.poll() is not None:
                pytest.fail(
                    f"`recsys serve llm` exited {cli.returncode}:\n{cli.stdout.read()}\n{log_tail(log)}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM did not become healthy in 600 s:\n{log_tail(log)}")
            time.sleep(1.0)
        yield url, cli
    finally:
        if cli.poll() is None:
            cli.send_signal(signal.SIGTERM)
            try:
                cli.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(cli.pid, signal.SIGKILL)
                cli.wait()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"{url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def reference(trained_dir: Path) -> Backend:
    return make_backend("transformers", trained_dir, BackendConfig(beam_width=8))


@pytest.fixture(scope="module")
def histories(trained: tuple[Path, list[list[int]]]) -> list[list[int]]:
    """48 real users' histories (up to a few hundred items: truncated) and an empty one."""
    return [*trained[1][:48], []]


def test_openai_backend_gives_valid_ids_matching_transformers(
    served: tuple[str, subprocess.Popen],
    trained_dir: Path,
    reference: Backend,
    histories: list[list[int]],
) -> None:
    url, _ = served
    client = make_backend("openai", trained_dir, BackendConfig(beam_width=8), url=url)
    assert client.model == "recsys-lm"
    got = client.generate(histories, 5)
    want = reference.generate(histories, 5)
    for ours, theirs in zip(got, want, strict=True):
        assert len(ours) == 5 and all(0 <= i < reference.vocab.num_items for i, _ in ours)
        if ours[0][0] != theirs[0][0]:  # only a numerical near-tie may flip the order
            assert abs(ours[0][1] - theirs[0][1]) < 1e-3, (ours, theirs)
        assert ours[0][1] == pytest.approx(theirs[0][1], abs=1e-3)
    agree = sum(o[0][0] == t[0][0] for o, t in zip(got, want, strict=True)) / len(got)
    assert agree >= 0.9


def test_free_generation_with_the_processor_yields_catalogue_ids(
    served: tuple[str, subprocess.Popen],
    trained_dir: Path,
    reference: Backend,
    histories: list[list[int]],
) -> None:
    url, _ = served
    vocab = reference.vocab
    body = {
        "model": "recsys-lm",
        "prompt": [vocab.prompt_ids(h) for h in histories[:8]],
        "max_tokens": 8, "n": 4, "temperature": 1.0, "skip_special_tokens": True,
        "vllm_xargs": {"item_trie": str((trained_dir / "item_trie.json").resolve())},
    }  # fmt: skip
    choices = _post(url, body)["choices"]
    assert len(choices) == 32
    for choice in choices:  # sampled, unconstrained by beam search: the processor alone
        assert 0 <= vocab.ids.parse(choice["text"]) < vocab.num_items


def test_bad_processor_arguments_are_rejected(
    served: tuple[str, subprocess.Popen], trained_dir: Path
) -> None:
    url, _ = served
    client = make_backend(
        "openai", trained_dir, BackendConfig(beam_width=4), url=url, trie_path="/nonexistent.json"
    )
    with pytest.raises(ServerError, match="HTTP 400"):
        client.generate([[1, 2]], 2)


def test_sigterm_stops_server_and_engine(served: tuple[str, subprocess.Popen]) -> None:
    url, cli = served
    cli.send_signal(signal.SIGTERM)
    assert cli.wait(timeout=90) == 0
    output = cli.stdout.read() if cli.stdout else ""
    assert "vLLM server stopped" in output
    assert not _healthy(url)
    assert live_group_members(cli.pid) == []  # nothing of the CLI's process group is left
