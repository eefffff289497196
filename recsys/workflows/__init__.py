"""Workflows that couple the packages: training the edit generators, the serve benchmark.

``recsys.workflows`` is the lowest part of the application layer (docs/architecture.md):
it sits above ``codebook``, ``llm_cloud`` and ``device_ranker`` and may import all of them;
nothing below the application layer imports it (import-linter checks it).

Modules:

* :mod:`recsys.workflows.adaptor_data`: the frozen ranker as plain tensors, the request
  windows and their inputs (through the contract in :mod:`recsys.adaptor_inputs`).
* :mod:`recsys.workflows.adaptor_config`: :class:`AdaptorTrainConfig`, :class:`LoopConfig`.
* :mod:`recsys.workflows.generator_loop`: the training loop shared by both generators.
* :mod:`recsys.workflows.adaptor_training`: training of the adaptor and the DUET-style
  baseline against the frozen time-split ranker (next-window loss), prototypes, the
  artefact (read back with :mod:`codebook.adaptor_artifact`).
* :mod:`recsys.workflows.serve_bench`: the load benchmark of both gRPC services
  (``recsys bench serve``).
"""
