"""The device's gRPC RecommendationService (``recsys.device.v1``).

* :mod:`device_ranker.service.config`: :class:`DeviceConfig`, :class:`CloudLinkConfig`.
* :mod:`device_ranker.service.engine`: :class:`DeviceEngine`, the serving logic's facade
  (Recommend, RecordEvent, RequestEdit, ApplyEdit, status), no gRPC types in its
  interface; it composes:
* :mod:`device_ranker.service.users`: per-user state, the user store, the catalogue
  look-ups, each user's arm and serving mode;
* :mod:`device_ranker.service.ranking`: the ranking thread, micro-batched ranking with
  cached user states (top-k, evaluation probes);
* :mod:`device_ranker.service.cloud_edits`: edit requests to the cloud (uplink window,
  device summary), decoding, the prototype cache, fallback, pushed edits;
* :mod:`device_ranker.service.policy`: per-user arms (static or adapted, gate or timer).
* :mod:`device_ranker.service.event_log`: the live-traffic event log (one JSON line per event).
* :mod:`device_ranker.service.cloud_link`: the client of the cloud (deadline, token,
  TLS, health probing).
* :mod:`device_ranker.service.servicer`: protos <-> engine.
* :mod:`device_ranker.service.server`: start-up, health, shutdown (``recsys serve device``).

It talks to the cloud only through the generated protos (``recsys.rpc.cloud.v1``) and
never imports ``llm_cloud`` or ``codebook``.
"""
