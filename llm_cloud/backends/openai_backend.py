"""``openai`` backend: HTTP to a running vLLM OpenAI-compatible server.

Shapes: U users, B beams, D = L+1 levels, P prompts per request (<= 1,024, vLLM's cap).

The server must run the trie logits processor with processed log-probs, which is what
``recsys serve llm`` starts (:class:`llm_cloud.server.VllmServer`). The search is
:func:`llm_cloud.beam.stepwise_beam_search`; each of its D engine calls is one or more
``POST /v1/completions`` (prompts as token-id lists, sent concurrently when split)::

    {"model": "recsys-lm", "prompt": [[2, 5, 17, ...], ...], "max_tokens": 1,
     "temperature": 0, "logprobs": B, "return_tokens_as_token_ids": true,
     "vllm_xargs": {"item_trie": "/abs/MODEL_DIR/item_trie.json", "item_sep": 4, "item_eos": 3}}

and reads ``choices[i].logprobs.top_logprobs[0]`` (keys ``"token_id:123"``; choice i
answers prompt i). Traps avoided (docs/vllm-cpu-notes.md): ``use_beam_search`` ignores
every constraint over HTTP; unknown fields such as the old ``guided_choice`` are
silently ignored, which is why the search re-checks every token against the trie and
raises if the server did not constrain it. Plain ``urllib``: no extra dependency.

The client needs the model directory too (tokenizer + semantic IDs, to build token-id
prompts); ``trie_path`` is the trie file's path *as the server sees it* (default: the
model directory's ``item_trie.json``, right when client and server share a machine).

Example::

    backend = OpenAIBackend("artifacts/ml-100k/lm", url="http://127.0.0.1:8000")
    backend.generate([[3, 17, 42]], top_n=10)
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from llm_cloud.artifact import ensure_trie_file, load_item_vocab
from llm_cloud.backends.base import Backend, BackendConfig, Ranked
from llm_cloud.beam import stepwise_beam_search
from llm_cloud.server import ServerError

logger = logging.getLogger(__name__)

MAX_PROMPTS = 1024  # vLLM's VLLM_MAX_COMPLETION_PROMPTS default


class OpenAIBackend(Backend):
    """Client of a vLLM OpenAI-compatible server (see the module docstring).

    Args:
        model_dir: the served model's directory (for its tokenizer and semantic IDs).
        config: shared backend settings.
        url: server base URL (``http://host:port``).
        model: served model name (None: the first of ``GET /v1/models``).
        trie_path: the trie file's path on the server (None: ``MODEL_DIR/item_trie.json``).
        timeout: seconds per HTTP request.
        max_prompts: prompts per request (<= 1,024).
        concurrency: requests in flight when one level needs several.
        api_key: sent as ``Authorization: Bearer ...`` if given.
    """

    name = "openai"

    def __init__(
        self,
        model_dir: str | Path,
        config: BackendConfig | None = None,
        *,
        url: str = "http://127.0.0.1:8000",
        model: str | None = None,
        trie_path: str | None = None,
        timeout: float = 300.0,
        max_prompts: int = 512,
        concurrency: int = 4,
        api_key: str | None = None,
    ) -> None:
        self.config = config or BackendConfig()
        self.model_dir = Path(model_dir).resolve()
        self.vocab, self.meta = load_item_vocab(
            self.model_dir, self.config.codebook_dir, self.config.max_history
        )
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.max_prompts = max(1, min(int(max_prompts), MAX_PROMPTS))
        self.concurrency = max(1, int(concurrency))
        self.api_key = api_key
        self.trie_path = trie_path or str(ensure_trie_file(self.vocab, self.model_dir))
        self.model = model or self._first_model()
        self.requests = 0

    # ---- HTTP ----------------------------------------------------------------------------
    def _http(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            body = exc.read().decode("utf-8", errors="replace")[:500]
            raise ServerError(f"{method} {self.url}{path} -> HTTP {exc.code}: {body}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ServerError(
                f"cannot reach the vLLM server at {self.url} ({exc}); start it with "
                "`recsys serve llm --model DIR`"
            ) from None

    def _first_model(self) -> str:
        listing = self._http("GET", "/v1/models")
        models = [m.get("id") for m in listing.get("data", []) if m.get("id")]
        if not models:
            raise ServerError(f"{self.url}/v1/models lists no model")
        return str(models[0])

    def completion_request(self, prompts: list[list[int]], k: int) -> dict[str, Any]:
        """The body of one level's ``/v1/completions`` request."""
        sp = self.vocab.specials
        return {
            "model": self.model,
            "prompt": prompts,
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": k,
            "return_tokens_as_token_ids": True,
            "vllm_xargs": {"item_trie": self.trie_path, "item_sep": sp.sep, "item_eos": sp.eos},
        }

    @staticmethod
    def parse_top_logprobs(response: dict[str, Any], count: int) -> list[dict[int, float]]:
        """``choices[*].logprobs.top_logprobs[0]`` -> [count] {token id: logprob}."""
        choices = sorted(response.get("choices", []), key=lambda c: c.get("index", 0))
        if len(choices) != count:
            raise ServerError(f"the server answered {len(choices)} choices for {count} prompts")
        out: list[dict[int, float]] = []
        for choice in choices:
            tops = (choice.get("logprobs") or {}).get("top_logprobs") or [{}]
            row: dict[int, float] = {}
            for key, logprob in (tops[0] or {}).items():
                if not str(key).startswith("token_id:"):
                    raise ServerError(
                        f"unexpected logprob key {key!r}: the server ignored return_tokens_as_token_ids"
                    )
                row[int(str(key).split(":", 1)[1])] = float(logprob)
            out.append(row)
        return out

    def _step(self, prompts: list[list[int]], k: int) -> list[dict[int, float]]:
        chunks = [
            prompts[i : i + self.max_prompts] for i in range(0, len(prompts), self.max_prompts)
        ]

        def send(chunk: list[list[int]]) -> list[dict[int, float]]:
            self.requests += 1
            reply = self._http("POST", "/v1/completions", self.completion_request(chunk, k))
            return self.parse_top_logprobs(reply, len(chunk))

        if len(chunks) == 1:
            return send(chunks[0])
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(chunks))) as pool:
            return [row for part in pool.map(send, chunks) for row in part]

    def _search(
        self, prompts: list[list[int]], beams: int, top_n: int, exclude: list[set[int]] | None
    ) -> list[Ranked]:
        return stepwise_beam_search(self._step, self.vocab, prompts, beams, top_n, exclude)

    def health(self) -> bool:
        """Whether ``GET /health`` answers 200."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def info(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "url": self.url,
            "model": self.model,
            "trie_path": self.trie_path,
        }
