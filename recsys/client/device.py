"""Clients of the device's RecommendationService (``protos/device/v1``).

:class:`AsyncDeviceClient` (``grpc.aio``; the replay driver's) and :class:`DeviceClient`
(blocking) have the same methods, taking plain Python values and returning the frozen
dataclasses of :mod:`recsys.client.results`; deadlines, retries on UNAVAILABLE, the token
and TLS come from :class:`~recsys.client.transport.ClientOptions`; a failure raises a
typed :class:`~recsys.client.errors.ClientError`.

Example::

    with DeviceClient("127.0.0.1:50052", ClientOptions(token_file="me.token")) as dev:
        dev.record_event("u1", "i42", timestamp=1700000000)
        rec = dev.recommend("u1", k=10)
        rec.item_ids, rec.mode            # ['i7', ...], ServingMode.BASE

    async with AsyncDeviceClient(target) as dev:
        rec = await dev.recommend("u1", k=1, probe_item_ids=["i3", "i9"])
        rec.probe_ranks                   # (12, 40)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from recsys.client import convert
from recsys.client.results import (
    AppliedEdit,
    DeviceStatus,
    EditRequestResult,
    EventResult,
    Recommendation,
)
from recsys.client.transport import AsyncTransport, ClientOptions, SyncTransport, build_request
from recsys.rpc.device.v1 import recommendation_pb2 as pb
from recsys.rpc.device.v1 import recommendation_pb2_grpc as pb_grpc


class _Requests:
    """The request messages of the device's methods (one place for both clients)."""

    target: str

    def _recommend(
        self, user_id: str, k: int, candidates: Sequence[str] | None, include_seen: bool,
        base_model: bool, probe_item_ids: Sequence[str],
    ) -> Any:  # fmt: skip
        fields: dict[str, Any] = dict(
            user_id=user_id, k=k, include_seen=include_seen, base_model=base_model,
            probe_item_ids=list(probe_item_ids),
        )  # fmt: skip
        if candidates is not None:
            fields["candidates"] = build_request(
                pb.CandidateSet, "Recommend", self.target, item_ids=list(candidates)
            )
        return build_request(pb.RecommendRequest, "Recommend", self.target, **fields)

    def _record_event(self, user_id: str, item_id: str, timestamp: int, wait: bool) -> Any:
        return build_request(
            pb.RecordEventRequest, "RecordEvent", self.target,
            user_id=user_id, item_id=item_id, timestamp=timestamp, wait_for_edit=wait,
        )  # fmt: skip

    def _status(self, user_id: str | None) -> Any:
        return build_request(pb.GetStatusRequest, "GetStatus", self.target, user_id=user_id or "")

    def _request_edit(self, user_id: str, wait: bool) -> Any:
        return build_request(
            pb.RequestEditRequest, "RequestEdit", self.target, user_id=user_id, wait_for_edit=wait
        )

    def _apply_edit(self, user_id: str, payload: bytes, source: str) -> Any:
        return build_request(
            pb.ApplyEditRequest, "ApplyEdit", self.target,
            user_id=user_id, edit_payload=payload, source=source,
        )  # fmt: skip


class AsyncDeviceClient(_Requests):
    """The device service from asyncio code; create it inside the running event loop
    (``async with``, or :meth:`close` when done)."""

    def __init__(self, target: str, options: ClientOptions | None = None) -> None:
        self.target = target
        self._t = AsyncTransport(target, pb_grpc.RecommendationServiceStub, options)

    @property
    def options(self) -> ClientOptions:
        return self._t.options

    async def recommend(
        self, user_id: str, k: int = 10, *, candidates: Sequence[str] | None = None,
        include_seen: bool = False, base_model: bool = False,
        probe_item_ids: Sequence[str] = (), timeout_s: float | None = None,
    ) -> Recommendation:  # fmt: skip
        """Top-``k`` items for ``user_id`` (over ``candidates`` when given), and each
        probe's score and 1-based rank."""
        req = self._recommend(user_id, k, candidates, include_seen, base_model, probe_item_ids)
        return convert.recommendation(await self._t.call("Recommend", req, timeout_s), pb)

    async def record_event(
        self, user_id: str, item_id: str, timestamp: int, *, wait_for_edit: bool = False,
        timeout_s: float | None = None,
    ) -> EventResult:  # fmt: skip
        """Append an interaction; with ``wait_for_edit`` an edit request it triggers has
        finished when this returns."""
        req = self._record_event(user_id, item_id, timestamp, wait_for_edit)
        return convert.event_result(await self._t.call("RecordEvent", req, timeout_s), pb)

    async def status(
        self, user_id: str | None = None, *, timeout_s: float | None = None
    ) -> DeviceStatus:
        """The device's readiness and counters (and ``user_id``'s state when given)."""
        reply = await self._t.call("GetStatus", self._status(user_id), timeout_s)
        return convert.device_status(reply, pb)

    async def request_edit(
        self, user_id: str, *, wait_for_edit: bool = True, timeout_s: float | None = None
    ) -> EditRequestResult:
        """Ask the cloud for ``user_id``'s edit now."""
        reply = await self._t.call(
            "RequestEdit", self._request_edit(user_id, wait_for_edit), timeout_s
        )
        return convert.edit_request_result(reply, pb)

    async def apply_edit(
        self, user_id: str, edit_payload: bytes, *, source: str = "push",
        timeout_s: float | None = None,
    ) -> AppliedEdit:  # fmt: skip
        """Install an RSE1 edit for ``user_id`` (empty bytes: revert to the base model)."""
        req = self._apply_edit(user_id, edit_payload, source)
        return convert.applied_edit(await self._t.call("ApplyEdit", req, timeout_s), pb)

    async def close(self) -> None:
        await self._t.close()

    async def __aenter__(self) -> AsyncDeviceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class DeviceClient(_Requests):
    """The device service, blocking (``with``, or :meth:`close` when done)."""

    def __init__(self, target: str, options: ClientOptions | None = None) -> None:
        self.target = target
        self._t = SyncTransport(target, pb_grpc.RecommendationServiceStub, options)

    @property
    def options(self) -> ClientOptions:
        return self._t.options

    def recommend(
        self, user_id: str, k: int = 10, *, candidates: Sequence[str] | None = None,
        include_seen: bool = False, base_model: bool = False,
        probe_item_ids: Sequence[str] = (), timeout_s: float | None = None,
    ) -> Recommendation:  # fmt: skip
        """See :meth:`AsyncDeviceClient.recommend`."""
        req = self._recommend(user_id, k, candidates, include_seen, base_model, probe_item_ids)
        return convert.recommendation(self._t.call("Recommend", req, timeout_s), pb)

    def record_event(
        self, user_id: str, item_id: str, timestamp: int, *, wait_for_edit: bool = False,
        timeout_s: float | None = None,
    ) -> EventResult:  # fmt: skip
        """See :meth:`AsyncDeviceClient.record_event`."""
        req = self._record_event(user_id, item_id, timestamp, wait_for_edit)
        return convert.event_result(self._t.call("RecordEvent", req, timeout_s), pb)

    def status(self, user_id: str | None = None, *, timeout_s: float | None = None) -> DeviceStatus:
        """See :meth:`AsyncDeviceClient.status`."""
        return convert.device_status(
            self._t.call("GetStatus", self._status(user_id), timeout_s), pb
        )

    def request_edit(
        self, user_id: str, *, wait_for_edit: bool = True, timeout_s: float | None = None
    ) -> EditRequestResult:
        """See :meth:`AsyncDeviceClient.request_edit`."""
        reply = self._t.call("RequestEdit", self._request_edit(user_id, wait_for_edit), timeout_s)
        return convert.edit_request_result(reply, pb)

    def apply_edit(
        self, user_id: str, edit_payload: bytes, *, source: str = "push",
        timeout_s: float | None = None,
    ) -> AppliedEdit:  # fmt: skip
        """See :meth:`AsyncDeviceClient.apply_edit`."""
        req = self._apply_edit(user_id, edit_payload, source)
        return convert.applied_edit(self._t.call("ApplyEdit", req, timeout_s), pb)

    def close(self) -> None:
        self._t.close()

    def __enter__(self) -> DeviceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["AsyncDeviceClient", "DeviceClient"]
