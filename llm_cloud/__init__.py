"""The cloud side: the codebook LM, its serving backends and constrained decoding.

Depends on ``codebook`` and ``recsys`` core only (never ``device_ranker`` or
``recsys.cli``). Shapes: I items, D = L+1 tokens per semantic ID, U users, N top-N.

Modules:

* :mod:`llm_cloud.tokenizer`: the LM's tokenizer (special tokens + the codebook
  vocabulary in order), and item-token lookup in any Hugging Face tokenizer.
* :mod:`llm_cloud.prompts`: :class:`ItemVocab`: prompts ``<bos><user> ID ... <sep>`` from
  item histories, the valid-ID trie over one model's token ids.
* :mod:`llm_cloud.lm_config`: :class:`LMConfig` (validated training settings), :class:`LMResult`.
* :mod:`llm_cloud.lm_data`: training windows (prompt + answer tokens, loss weights), splits.
* :mod:`llm_cloud.lm_train`: :func:`train_lm` (small Llama from scratch on every
  next-item position; the GPU fine-tuning path).
* :mod:`llm_cloud.artifact`: the model directory (HF files + semantic IDs + trie file +
  ``recsys_lm.json``): :func:`save_lm` writes it, :func:`load_item_vocab` reads it.
* :mod:`llm_cloud.backends`: ``generate(histories, top_n) -> [(item, score)]`` behind
  ``transformers`` / ``vllm`` / ``openai`` (:func:`make_backend`).
* :mod:`llm_cloud.beam`: level-wise constrained beam search over a one-token engine call.
* :mod:`llm_cloud.vllm_trie_lp`: the vLLM logits processor (runs inside vLLM's venv).
* :mod:`llm_cloud.vllm_worker`: ``vllm.LLM`` behind a JSON-lines pipe (vLLM's venv).
* :mod:`llm_cloud.vllm_env`, :mod:`llm_cloud.server`: vLLM child processes (env, the
  OpenAI-compatible server, clean shutdown).
* :mod:`llm_cloud.bench`: generative-retrieval metrics and throughput helpers.

This package's ``__init__`` imports nothing: the vLLM processes import
``llm_cloud.vllm_trie_lp`` / ``llm_cloud.vllm_worker`` from an environment that has
neither this project's dependencies nor the main venv's transformers.

Example::

    from llm_cloud.backends import make_backend
    with make_backend("transformers", "~/.cache/recsys-llm-edit/artifacts/ml-100k/lm") as lm:
        lm.generate([[3, 17, 42], []], top_n=10)     # [[(item, log-prob), ...], ...]
"""
