"""Semantic codebook: residual quantisation of item vectors into collision-free semantic IDs.

Depends on ``recsys`` core only (data, features, errors, settings). Shapes: I items,
D feature dim, L quantised levels, K codes per level.

Modules:

* :mod:`codebook.quantizer`: the :class:`ResidualQuantizer` interface, default K,
  faiss k-means, input checks.
* :mod:`codebook.rq_kmeans`: :class:`RQKMeans`, one faiss k-means per level (seconds).
* :mod:`codebook.rqvae`: :func:`train_rqvae`, an MLP RQ-VAE (commitment loss,
  straight-through estimator, k-means init, dead-code reset); imports torch.
* :mod:`codebook.semantic_ids`: :class:`SemanticIdMap` (codes [I, L+1] with the
  TIGER disambiguation level, token strings, vocabulary, parsing) and
  :class:`SemanticIdTrie` (valid next tokens for constrained decoding).
* :mod:`codebook.report`: usage, perplexity, dead codes, collisions, reconstruction.
* :mod:`codebook.train`: :func:`train_codebook`, :class:`Codebook` save / load.

The interface for the LLM (``llm_cloud``), the adaptor and the device:

* Token strings ``<a_12><b_7><c_201><d_0>``: level letters a, b, c, ... with the last
  letter the disambiguation level; one token per level.
* ``ids = SemanticIdMap.load(codebook_dir)`` (numpy only). ``ids.vocabulary()`` is the
  list of all code tokens in a fixed order (level by level, code by code); a tokenizer
  appends it after its S special tokens and passes ``offset=S`` to every token-id
  method: ``ids.token_ids(items, offset)`` [N, L+1], ``ids.items_of_token_ids(rows,
  offset)`` [N] (-1 = no item), ``ids.parse(text)``, ``ids.to_tokens(item)``.
* Constrained decoding: ``trie = ids.trie(offset=S)``;
  ``trie.allowed_next(prefix_ids)`` -> list of token ids ([] when the prefix is a
  complete ID or invalid), ``trie.allowed_mask(prefixes, V)`` -> bool [B, V].

Example::

    from codebook import CodebookConfig, SemanticIdMap, train_codebook
    cb = train_codebook(features.matrix, CodebookConfig(method="rqkmeans", codes=64))
    print(cb.report.to_markdown())
    cb.save("artifacts/ml-100k/codebook")
    ids = SemanticIdMap.load("artifacts/ml-100k/codebook")
    ids.to_tokens(0), ids.parse(ids.to_tokens(0))     # ('<a_..><b_..><c_..><d_0>', 0)
"""

from codebook.quantizer import ResidualQuantizer, default_codes
from codebook.report import CodebookReport, codebook_report
from codebook.rq_kmeans import RQKMeans, RQKMeansConfig
from codebook.semantic_ids import LEVEL_NAMES, SemanticIdMap, SemanticIdTrie, collision_stats
from codebook.train import Codebook, CodebookConfig, codebook_dir, load_codebook, train_codebook

__all__ = [
    "LEVEL_NAMES",
    "Codebook",
    "CodebookConfig",
    "CodebookReport",
    "RQKMeans",
    "RQKMeansConfig",
    "ResidualQuantizer",
    "SemanticIdMap",
    "SemanticIdTrie",
    "codebook_dir",
    "codebook_report",
    "collision_stats",
    "default_codes",
    "load_codebook",
    "train_codebook",
]
