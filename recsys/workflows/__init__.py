"""Top-level workflows that couple the packages (cloud generator + frozen device ranker).

``recsys.workflows`` sits above ``codebook``, ``llm_cloud`` and ``device_ranker`` (DESIGN.md
section 2): it may import all of them, and nothing below imports it.

Modules:

* :mod:`recsys.workflows.adaptor_data`: the frozen ranker as plain tensors, the
  generators' inputs (tokens, device summary) and the request windows.
* :mod:`recsys.workflows.adaptor_training`: training of the adaptor and the DUET-style
  baseline against the frozen time-split ranker (next-window loss), prototypes.
* :mod:`recsys.workflows.adaptor_eval`: the first offline check on the replay period.
"""
