"""LLM backends behind one interface: :class:`Backend`, :func:`make_backend`.

``transformers`` (in-process), ``vllm`` (vLLM engine in a worker process of the vLLM
environment), ``openai`` (HTTP to a vLLM OpenAI-compatible server). Heavy modules are
imported only when a backend is built.
"""

from llm_cloud.backends.base import BACKENDS, Backend, BackendConfig, Ranked, make_backend

__all__ = ["BACKENDS", "Backend", "BackendConfig", "Ranked", "make_backend"]
