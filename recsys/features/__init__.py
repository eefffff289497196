"""Item features: text embeddings, dataset modality matrices and their fusion.

* :mod:`recsys.features.text`: item text from its columns -> all-MiniLM-L6-v2 vectors.
* :mod:`recsys.features.cache`: the content-addressed on-disk embedding cache.
* :mod:`recsys.features.fuse`: :class:`ItemFeatures`, fusion, save/load, summaries.

Example::

    from recsys.features import build_item_features, summarise
    feats = build_item_features(ds)          # [I, D] float32, unit rows
    for row in summarise(feats): print(row)
"""

from recsys.features.fuse import (
    ItemFeatures,
    available_modalities,
    build_item_features,
    fuse,
    summarise,
)
from recsys.features.text import MiniLMEncoder, TextStats, item_texts, text_features

__all__ = [
    "ItemFeatures",
    "MiniLMEncoder",
    "TextStats",
    "available_modalities",
    "build_item_features",
    "fuse",
    "item_texts",
    "summarise",
    "text_features",
]
