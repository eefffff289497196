"""The openai backend against a fake vLLM server: request format, parsing, constraint check.

The fake answers /v1/completions like vLLM with the trie logits processor and
``logprobs_mode=processed_logprobs``, computing the numbers with the tiny model in this
process; so the openai backend must return exactly what the transformers backend does.
(The real server is covered by the vllm-marked integration test.)
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from llm_cloud.backends import BackendConfig, make_backend
from llm_cloud.backends.base import Backend
from llm_cloud.beam import ConstraintError
from llm_cloud.server import ServerError


class FakeVllm:
    """State of the fake server: the model, the requests seen, the behaviour switches."""

    def __init__(self, backend: Backend) -> None:
        self.model = backend.model
        self.vocab = backend.vocab
        self.requests: list[dict[str, Any]] = []
        self.constrain = True
        self.status = 200

    def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        xargs = body.get("vllm_xargs") or {}
        k = int(body["logprobs"])
        choices = []
        for index, prompt in enumerate(body["prompt"]):
            sep = xargs.get("item_sep")
            last = (
                max(i for i, t in enumerate(prompt) if t == sep)
                if sep is not None
                else len(prompt) - 1
            )
            prefix = prompt[last + 1 :]
            with torch.inference_mode():
                logits = self.model(torch.tensor([prompt])).logits[0, -1]
            if self.constrain and "item_trie" in xargs:
                allowed = self.vocab.trie.allowed_next(prefix) or [self.vocab.specials.eos]
                mask = torch.full_like(logits, float("-inf"))
                mask[allowed] = 0.0
                logits = logits + mask
            logp = torch.log_softmax(logits, dim=-1)
            values, tokens = logp.topk(k)
            top = {
                f"token_id:{int(t)}": max(float(v), -9999.0)
                for v, t in zip(values, tokens, strict=True)
            }
            choices.append({"index": index, "text": "", "logprobs": {"top_logprobs": [top]}})
        return {"object": "text_completion", "choices": list(reversed(choices))}  # order by index!


@pytest.fixture(scope="module")
def reference(tiny_lm_dir: Path) -> Backend:
    return make_backend("transformers", tiny_lm_dir, BackendConfig(beam_width=6, batch_users=3))


@pytest.fixture(scope="module")
def fake(reference: Backend) -> Iterator[tuple[FakeVllm, str]]:
    state = FakeVllm(reference)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _send(self, code: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/v1/models":
                self._send(200, {"data": [{"id": "fake-lm"}]})
            elif self.path == "/health":
                self._send(200, {})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state.requests.append(body)
            if state.status != 200:
                self._send(state.status, {"error": {"message": "item_trie must be a path"}})
            else:
                self._send(200, state.completions(body))

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def client(fake: tuple[FakeVllm, str], tiny_lm_dir: Path) -> Backend:
    state, url = fake
    state.requests.clear()
    state.constrain, state.status = True, 200
    return make_backend(
        "openai", tiny_lm_dir, BackendConfig(beam_width=6, batch_users=3), url=url, max_prompts=5
    )


def test_results_equal_the_transformers_backend(client: Backend, reference: Backend) -> None:
    batch = [[1, 2, 3], [], [30, 31, 32, 33, 34, 35, 36, 37, 38], [7], [12, 13]]
    for ours, theirs in zip(client.generate(batch, 4), reference.generate(batch, 4), strict=True):
        assert [i for i, _ in ours] == [i for i, _ in theirs]
        assert [s for _, s in ours] == pytest.approx([s for _, s in theirs], abs=1e-4)


def test_request_format(client: Backend, fake: tuple[FakeVllm, str], tiny_lm_dir: Path) -> None:
    state, _ = fake
    client.generate([[1, 2], [3]], 2)
    vocab = client.vocab
    assert client.model == "fake-lm"  # found through /v1/models
    first = state.requests[0]
    assert first["model"] == "fake-lm" and first["max_tokens"] == 1 and first["temperature"] == 0.0
    assert first["logprobs"] == 6 and first["return_tokens_as_token_ids"] is True
    assert first["prompt"] == [vocab.prompt_ids([1, 2]), vocab.prompt_ids([3])]
    xargs = first["vllm_xargs"]
    assert xargs["item_sep"] == vocab.specials.sep and xargs["item_eos"] == vocab.specials.eos
    assert Path(xargs["item_trie"]) == (tiny_lm_dir / "item_trie.json").resolve()
    assert "use_beam_search" not in first and "guided_choice" not in first
    # level 1 asks for every beam prefix, split into requests of <= max_prompts (5)
    assert all(len(r["prompt"]) <= 5 for r in state.requests)
    assert all(p[-1] != vocab.specials.sep for r in state.requests[1:] for p in r["prompt"])


def test_an_unconstrained_server_is_detected(client: Backend, fake: tuple[FakeVllm, str]) -> None:
    state, _ = fake
    state.constrain = False
    with pytest.raises(ConstraintError, match="trie"):
        client.generate([[1, 2, 3]], 3)


def test_http_errors_become_server_errors(
    client: Backend, fake: tuple[FakeVllm, str], tiny_lm_dir: Path
) -> None:
    state, _ = fake
    state.status = 400
    with pytest.raises(ServerError, match=r"HTTP 400.*item_trie"):
        client.generate([[1]], 3)
    with pytest.raises(ServerError, match="cannot reach"):
        make_backend("openai", tiny_lm_dir, url="http://127.0.0.1:9", timeout=2)


def test_parse_top_logprobs_checks_counts_and_keys() -> None:
    from llm_cloud.backends.openai_backend import OpenAIBackend

    reply = {"choices": [{"index": 1, "logprobs": {"top_logprobs": [{"token_id:7": -0.5}]}},
                         {"index": 0, "logprobs": {"top_logprobs": [{"token_id:9": -0.1, "token_id:3": -9999.0}]}}]}  # fmt: skip
    assert OpenAIBackend.parse_top_logprobs(reply, 2) == [{9: -0.1, 3: -9999.0}, {7: -0.5}]
    with pytest.raises(ServerError, match="choices"):
        OpenAIBackend.parse_top_logprobs(reply, 3)
    with pytest.raises(ServerError, match="token_ids"):
        OpenAIBackend.parse_top_logprobs(
            {"choices": [{"logprobs": {"top_logprobs": [{"<a_1>": -1.0}]}}]}, 1
        )
