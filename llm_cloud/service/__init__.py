"""The cloud's gRPC AdaptationService (``recsys.cloud.v1``).

* :mod:`llm_cloud.service.engine`: the :class:`AdaptationEngine` protocol
  (``generate_edits(requests) -> results``), request validation, and
  :class:`ComposedEngine` (codebook LM or recent-item tokens + adaptor + prototype bank +
  store).
* :mod:`llm_cloud.service.loading`: :func:`engine_from_artifacts`, the engine built from
  the trained artefacts.
* :mod:`llm_cloud.service.tiny`: the same engine from seeded random stand-ins (tests).
* :mod:`llm_cloud.service.servicer`: protos <-> engine, micro-batched GenerateEdit.
* :mod:`llm_cloud.service.server`: start-up, token check, health, shutdown
  (``recsys serve cloud``).

It never imports the device side; devices reach it only through the protos.
"""
