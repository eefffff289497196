"""gRPC servicer of the cloud: ``recsys.cloud.v1`` protos <-> :class:`AdaptationEngine`.

GenerateEdit requests are validated (:func:`~llm_cloud.service.engine.build_request`)
and queued into a :class:`recsys.serving.batching.MicroBatcher`, so concurrent calls
share one engine call (LM + adaptor on a batch). A caller whose deadline passes while
queued is dropped before the engine runs. Domain errors become status codes in the
server's one interceptor (:mod:`recsys.serving.errors`); nothing here sets a code.

With a fleet guard (``recsys serve cloud --fleet-guard harm|proof``), a request's
``guard_evidence`` (the device's cumulative harm-guard evidence) replaces that device's
previous report in the replica's pooled evidence
(:class:`recsys.serving.fleet_guard.FleetEvidence`) before the edit is made, and the
response carries the decision (apply / hold) on the pooled evidence and its figures.
"""

from __future__ import annotations

import asyncio
import logging

import grpc.aio

from llm_cloud.service.engine import AdaptationEngine, EditResult, PrototypeView, build_request
from recsys.errors import ValidationError
from recsys.rpc.cloud.v1 import adaptation_pb2 as cpb
from recsys.rpc.cloud.v1 import adaptation_pb2_grpc as cpb_grpc
from recsys.serving.batching import BatchConfig, MicroBatcher
from recsys.serving.errors import NotReadyError
from recsys.serving.fleet_guard import APPLY, FleetEvidence, FleetGuardConfig

logger = logging.getLogger(__name__)

SERVICE_NAME = cpb.DESCRIPTOR.services_by_name["AdaptationService"].full_name
DTYPE_NAMES = {
    cpb.PAYLOAD_DTYPE_FP16: "fp16",
    cpb.PAYLOAD_DTYPE_INT8: "int8",
    cpb.PAYLOAD_DTYPE_FP32: "fp32",
}
STATE_DTYPE_NAMES = {cpb.STATE_DTYPE_FP16: "fp16", cpb.STATE_DTYPE_FP32: "fp32"}


def _prototype_pb(view: PrototypeView) -> cpb.Prototype:
    return cpb.Prototype(
        ref=cpb.PrototypeRef(id=view.prototype_id, version=view.version),
        name=view.name,
        member_count=max(0, view.member_count),
        edit_payload=view.payload or b"",
        created_at=int(view.created_at.timestamp()) if view.created_at else 0,
    )


class AdaptationServicer(cpb_grpc.AdaptationServiceServicer):
    """The AdaptationService over one engine (None while loading: UNAVAILABLE).

    Args:
        batch: micro-batching of GenerateEdit (``max_batch=1`` turns it off).
        default_dtype: payload precision when a request leaves it unspecified.
        fleet_guard: the fleet guard (None or mode "off": no decision is sent).
    """

    def __init__(
        self,
        batch: BatchConfig | None = None,
        default_dtype: str = "fp16",
        fleet_guard: FleetGuardConfig | None = None,
    ) -> None:
        self.batch = batch or BatchConfig()
        self.default_dtype = default_dtype
        on = fleet_guard is not None and fleet_guard.mode != "off"
        self.fleet: FleetEvidence | None = FleetEvidence(fleet_guard) if on else None
        self._engine: AdaptationEngine | None = None
        self._item_index: dict[str, int] = {}
        self.batcher: MicroBatcher | None = None

    @property
    def engine(self) -> AdaptationEngine:
        if self._engine is None:
            raise NotReadyError("the cloud engine is still loading; retry shortly")
        return self._engine

    def set_engine(self, engine: AdaptationEngine) -> None:
        """Install the loaded engine (and its micro-batcher)."""
        self._item_index = {item: i for i, item in enumerate(engine.item_ids)}
        self.batcher = MicroBatcher(engine.generate_edits, self.batch, name="generate-edit")
        self._engine = engine

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()

    def _dtype(self, value: int) -> str:
        if value == cpb.PAYLOAD_DTYPE_UNSPECIFIED:
            return self.default_dtype
        if value not in DTYPE_NAMES:
            raise ValidationError(f"unknown payload dtype {value}")
        return DTYPE_NAMES[value]

    async def GenerateEdit(
        self, request: cpb.GenerateEditRequest, context: grpc.aio.ServicerContext
    ) -> cpb.GenerateEditResponse:
        engine = self.engine
        cached = None
        if request.HasField("cached_prototype") and request.cached_prototype.id:
            cached = (request.cached_prototype.id, request.cached_prototype.version)
        states: dict = {}
        if request.HasField("recent_states"):
            rs = request.recent_states
            states = dict(
                states=rs.states,
                state_dim=rs.state_dim,
                state_dtype=STATE_DTYPE_NAMES.get(rs.dtype),
                earlier_item_ids=rs.earlier_item_ids,
            )
        edit_request = build_request(
            engine,
            self._item_index,
            device_id=request.device_id,
            item_ids=request.recent_item_ids,
            timestamps=request.recent_timestamps,
            summary=request.summary,
            model_version=request.model_version,
            payload_dtype=self._dtype(request.payload_dtype),
            cached_prototype=cached,
            top_n=request.top_n,
            **states,
        )
        if self.fleet is not None and request.HasField("guard_evidence"):
            ev = request.guard_evidence  # validated before the engine runs: nothing pooled
            self.fleet.report(  # from a request that fails validation
                edit_request.device_id, ev.clicks, ev.gain_diff_sum, ev.gain_diff_sum_squares
            )
        assert self.batcher is not None
        result: EditResult = await self.batcher.submit(edit_request)
        reply = cpb.GenerateEditResponse(
            edit_payload=result.payload,
            edit_id=result.edit_id,
            generated_item_ids=[engine.item_ids[i] for i in result.generated_items],
            tokens=result.tokens,
            batch_size=result.batch_size,
            engine_ms=result.engine_ms,
            refined=result.refined,
        )
        if self.fleet is not None:
            fleet = self.fleet
            reply.decision = (
                cpb.EDIT_DECISION_APPLY if fleet.decide() == APPLY else cpb.EDIT_DECISION_HOLD
            )
            reply.fleet_clicks = round(fleet.n)
            reply.fleet_devices = fleet.devices
            reply.fleet_mean_gain_diff = fleet.mean
        if result.prototype is not None:
            reply.prototype_ref.id, reply.prototype_ref.version = result.prototype
            if result.prototype_payload is not None:
                reply.prototype.CopyFrom(
                    cpb.Prototype(
                        ref=cpb.PrototypeRef(id=result.prototype[0], version=result.prototype[1]),
                        edit_payload=result.prototype_payload,
                    )
                )
        return reply

    async def GetPrototype(
        self, request: cpb.GetPrototypeRequest, context: grpc.aio.ServicerContext
    ) -> cpb.Prototype:
        engine = self.engine
        if request.prototype_id < 1:
            raise ValidationError("prototype_id must be >= 1")
        view = await asyncio.to_thread(
            engine.get_prototype,
            request.prototype_id,
            request.version or None,
            self._dtype(request.payload_dtype),
        )
        return _prototype_pb(view)

    async def ListPrototypes(
        self, request: cpb.ListPrototypesRequest, context: grpc.aio.ServicerContext
    ) -> cpb.ListPrototypesResponse:
        views = await asyncio.to_thread(self.engine.list_prototypes)
        return cpb.ListPrototypesResponse(
            prototypes=[
                cpb.ListPrototypesResponse.Entry(
                    id=v.prototype_id,
                    name=v.name,
                    current_version=v.version,
                    created_at=int(v.created_at.timestamp()) if v.created_at else 0,
                )
                for v in views
            ]
        )
