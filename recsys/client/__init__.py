"""A typed Python client of the two gRPC services (issue 18).

* :class:`DeviceClient` / :class:`AsyncDeviceClient`: the device's RecommendationService
  (``recommend``, ``record_event``, ``status``, ``request_edit``, ``apply_edit``);
* :class:`CloudClient` / :class:`AsyncCloudClient`: the cloud's AdaptationService
  (``generate_edit``, ``get_prototype``, ``list_prototypes``);
* :class:`ClientOptions` / :class:`RetryPolicy`: the deadline of each attempt, retries
  on UNAVAILABLE with jittered exponential back-off, the caller's token (string or file)
  and TLS (:mod:`recsys.client.transport`);
* results are frozen dataclasses (:mod:`recsys.client.results`); failures raise typed
  errors (:mod:`recsys.client.errors`), e.g. :class:`InvalidArgumentError`,
  :class:`DeadlineExceededError`.

Part of the recsys core layer: it imports only the generated stubs and
:mod:`recsys.serving` (tokens, message limits), never the services' code.

Example::

    from recsys.client import ClientOptions, DeviceClient

    with DeviceClient("127.0.0.1:50052", ClientOptions(timeout_s=2, token_file="u1.token")) as dev:
        dev.record_event("u1", "i42", timestamp=1700000000, wait_for_edit=True)
        print(dev.recommend("u1", k=5).item_ids, dev.status("u1").user.mode)
"""

from recsys.client.cloud import AsyncCloudClient, CloudClient
from recsys.client.device import AsyncDeviceClient, DeviceClient
from recsys.client.errors import (
    ClientError,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    ServerError,
    UnauthenticatedError,
    UnavailableError,
)
from recsys.client.results import (
    AppliedEdit,
    DeviceStatus,
    EditCost,
    EditOutcome,
    EditRef,
    EditRequestResult,
    EventResult,
    GeneratedEdit,
    Prototype,
    PrototypeEntry,
    PrototypeRef,
    Recommendation,
    ScoredItem,
    ServingMode,
    UserStatus,
)
from recsys.client.transport import ClientOptions, RetryPolicy

__all__ = [
    "AppliedEdit",
    "AsyncCloudClient",
    "AsyncDeviceClient",
    "ClientError",
    "ClientOptions",
    "CloudClient",
    "DeadlineExceededError",
    "DeviceClient",
    "DeviceStatus",
    "EditCost",
    "EditOutcome",
    "EditRef",
    "EditRequestResult",
    "EventResult",
    "GeneratedEdit",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "Prototype",
    "PrototypeEntry",
    "PrototypeRef",
    "Recommendation",
    "ResourceExhaustedError",
    "RetryPolicy",
    "ScoredItem",
    "ServerError",
    "ServingMode",
    "UnauthenticatedError",
    "UnavailableError",
    "UserStatus",
]
