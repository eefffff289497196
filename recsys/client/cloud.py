"""Clients of the cloud's AdaptationService (``protos/cloud/v1``): an edit for a device,
and the prototypes.

:class:`AsyncCloudClient` and :class:`CloudClient` (blocking) have the same methods,
return the dataclasses of :mod:`recsys.client.results` and follow the same deadline,
retry, token and TLS rules as the device clients
(:class:`~recsys.client.transport.ClientOptions`).

Example::

    with CloudClient("127.0.0.1:50051", ClientOptions(token_file="operator.token")) as cloud:
        edit = cloud.generate_edit("phone-42", ["i1", "i7", "i9"])
        edit.edit_id, len(edit.edit_payload), edit.prototype_ref   # 17, 6712, PrototypeRef(2, 1)
        [p.name for p in cloud.list_prototypes()]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from recsys.client import convert
from recsys.client.results import GeneratedEdit, Prototype, PrototypeEntry, PrototypeRef
from recsys.client.transport import AsyncTransport, ClientOptions, SyncTransport, build_request
from recsys.rpc.cloud.v1 import adaptation_pb2 as cpb
from recsys.rpc.cloud.v1 import adaptation_pb2_grpc as cpb_grpc

PayloadDtype = Literal["fp16", "int8", "fp32", "default"]


class _Requests:
    target: str

    def _generate(
        self, device_id: str, recent_item_ids: Sequence[str], recent_timestamps: Sequence[int],
        summary: Sequence[float], model_version: str, payload_dtype: PayloadDtype,
        cached_prototype: PrototypeRef | None, top_n: int,
    ) -> Any:  # fmt: skip
        fields: dict[str, Any] = dict(
            device_id=device_id, recent_item_ids=list(recent_item_ids),
            recent_timestamps=list(recent_timestamps), summary=list(summary),
            model_version=model_version, payload_dtype=_dtype(payload_dtype, "GenerateEdit", self.target),
            top_n=top_n,
        )  # fmt: skip
        if cached_prototype is not None:
            fields["cached_prototype"] = build_request(
                cpb.PrototypeRef, "GenerateEdit", self.target,
                id=cached_prototype.id, version=cached_prototype.version,
            )  # fmt: skip
        return build_request(cpb.GenerateEditRequest, "GenerateEdit", self.target, **fields)

    def _get_prototype(self, prototype_id: int, version: int, dtype: PayloadDtype) -> Any:
        return build_request(
            cpb.GetPrototypeRequest, "GetPrototype", self.target,
            prototype_id=prototype_id, version=version,
            payload_dtype=_dtype(dtype, "GetPrototype", self.target),
        )  # fmt: skip


def _dtype(name: str, method: str, target: str) -> int:
    from recsys.client.errors import InvalidArgumentError

    key = "UNSPECIFIED" if name == "default" else str(name).upper()
    try:
        return cpb.PayloadDtype.Value(f"PAYLOAD_DTYPE_{key}")
    except ValueError:
        raise InvalidArgumentError(
            method, target, f"payload_dtype must be fp16, int8, fp32 or default, got {name!r}"
        ) from None


class AsyncCloudClient(_Requests):
    """The cloud service from asyncio code (create it inside the running loop)."""

    def __init__(self, target: str, options: ClientOptions | None = None) -> None:
        self.target = target
        self._t = AsyncTransport(target, cpb_grpc.AdaptationServiceStub, options)

    async def generate_edit(
        self, device_id: str, recent_item_ids: Sequence[str], *,
        recent_timestamps: Sequence[int] = (), summary: Sequence[float] = (),
        model_version: str = "", payload_dtype: PayloadDtype = "default",
        cached_prototype: PrototypeRef | None = None, top_n: int = 0,
        timeout_s: float | None = None,
    ) -> GeneratedEdit:  # fmt: skip
        """One edit for ``device_id`` from its recent items (oldest first)."""
        req = self._generate(device_id, recent_item_ids, recent_timestamps, summary,
                             model_version, payload_dtype, cached_prototype, top_n)  # fmt: skip
        return convert.generated_edit(await self._t.call("GenerateEdit", req, timeout_s))

    async def get_prototype(
        self, prototype_id: int, version: int = 0, *, payload_dtype: PayloadDtype = "default",
        timeout_s: float | None = None,
    ) -> Prototype:  # fmt: skip
        """A prototype's edit (``version`` 0 = the current one)."""
        req = self._get_prototype(prototype_id, version, payload_dtype)
        return convert.prototype(await self._t.call("GetPrototype", req, timeout_s))

    async def list_prototypes(self, *, timeout_s: float | None = None) -> list[PrototypeEntry]:
        """Every prototype with its current version (no payloads)."""
        reply = await self._t.call("ListPrototypes", cpb.ListPrototypesRequest(), timeout_s)
        return convert.prototype_entries(reply)

    async def close(self) -> None:
        await self._t.close()

    async def __aenter__(self) -> AsyncCloudClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class CloudClient(_Requests):
    """The cloud service, blocking (``with``, or :meth:`close` when done)."""

    def __init__(self, target: str, options: ClientOptions | None = None) -> None:
        self.target = target
        self._t = SyncTransport(target, cpb_grpc.AdaptationServiceStub, options)

    def generate_edit(
        self, device_id: str, recent_item_ids: Sequence[str], *,
        recent_timestamps: Sequence[int] = (), summary: Sequence[float] = (),
        model_version: str = "", payload_dtype: PayloadDtype = "default",
        cached_prototype: PrototypeRef | None = None, top_n: int = 0,
        timeout_s: float | None = None,
    ) -> GeneratedEdit:  # fmt: skip
        """See :meth:`AsyncCloudClient.generate_edit`."""
        req = self._generate(device_id, recent_item_ids, recent_timestamps, summary,
                             model_version, payload_dtype, cached_prototype, top_n)  # fmt: skip
        return convert.generated_edit(self._t.call("GenerateEdit", req, timeout_s))

    def get_prototype(
        self, prototype_id: int, version: int = 0, *, payload_dtype: PayloadDtype = "default",
        timeout_s: float | None = None,
    ) -> Prototype:  # fmt: skip
        """See :meth:`AsyncCloudClient.get_prototype`."""
        req = self._get_prototype(prototype_id, version, payload_dtype)
        return convert.prototype(self._t.call("GetPrototype", req, timeout_s))

    def list_prototypes(self, *, timeout_s: float | None = None) -> list[PrototypeEntry]:
        """See :meth:`AsyncCloudClient.list_prototypes`."""
        reply = self._t.call("ListPrototypes", cpb.ListPrototypesRequest(), timeout_s)
        return convert.prototype_entries(reply)

    def close(self) -> None:
        self._t.close()

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["AsyncCloudClient", "CloudClient", "PayloadDtype"]
