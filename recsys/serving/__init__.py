"""Plumbing shared by the two gRPC services (device and cloud), in the ``recsys`` core.

Both ``device_ranker.service`` and ``llm_cloud.service`` import it, so it imports only
``grpc`` (and its health / reflection packages), the standard library and
``recsys.errors``: never a project package above the core (import-linter checks it).

Modules (one concern each):

* :mod:`recsys.serving.errors`: THE place that maps domain errors to status codes: the
  server interceptor (ValidationError -> INVALID_ARGUMENT, NotFoundError -> NOT_FOUND,
  not ready -> UNAVAILABLE, anything else -> INTERNAL with a generic message, logged).
* :mod:`recsys.serving.auth`: signed per-device tokens (JWT, HS256) and the interceptor
  that checks them (UNAUTHENTICATED / PERMISSION_DENIED before any handler runs).
* :mod:`recsys.serving.keys`: the signing keys (key files, the key ring, rotation).
* :mod:`recsys.serving.redact`: user and device ids as a short hash in logs.
* :mod:`recsys.serving.batching`: an asyncio micro-batcher (concurrent calls -> one
  engine call, with a small wait budget).
* :mod:`recsys.serving.server`: server options (message sizes, TLS, grace), health and
  reflection, SIGTERM-driven graceful shutdown, client channel options.
* :mod:`recsys.serving.service_host`: the start-up (bind NOT_SERVING, load, attach,
  SERVING) and shutdown sequence both servers share.
* :mod:`recsys.serving.fingerprint`: the ranker's model version on the wire.
* :mod:`recsys.serving.process`: a ``recsys serve ...`` server as a child process
  (benchmarks, the demo, the end-to-end test).
* :mod:`recsys.serving.loadgen`: closed- and open-loop load generation with latency
  percentiles (``recsys bench serve``).

The generated stubs live in ``recsys.rpc`` (built by ``scripts/gen_protos.py``).
"""
