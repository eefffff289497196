"""gRPC servicer of the device: translates ``recsys.device.v1`` protos <-> :class:`DeviceEngine`.

No logic and no status codes here: validation and domain errors come from the engine
and are mapped to status codes by the server's one interceptor
(:mod:`recsys.serving.errors`).
"""

from __future__ import annotations

import logging

import grpc.aio

from device_ranker.service.cloud_edits import FetchResult
from device_ranker.service.engine import DeviceEngine
from device_ranker.service.users import (
    BASE,
    EDITED,
    FALLBACK_BASE,
    FALLBACK_LAST_EDIT,
    EditInfo,
)
from recsys.rpc.device.v1 import recommendation_pb2 as pb
from recsys.rpc.device.v1 import recommendation_pb2_grpc as pb_grpc
from recsys.serving.errors import NotReadyError

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RecommendationService"].full_name
MODES = {
    BASE: pb.SERVING_MODE_BASE,
    EDITED: pb.SERVING_MODE_EDITED,
    FALLBACK_LAST_EDIT: pb.SERVING_MODE_FALLBACK_LAST_EDIT,
    FALLBACK_BASE: pb.SERVING_MODE_FALLBACK_BASE,
}
OUTCOMES = {
    "not_requested": pb.EDIT_OUTCOME_NOT_REQUESTED,
    "pending": pb.EDIT_OUTCOME_PENDING,
    "applied": pb.EDIT_OUTCOME_APPLIED,
    "failed": pb.EDIT_OUTCOME_FAILED,
    "in_flight": pb.EDIT_OUTCOME_IN_FLIGHT,
    "held": pb.EDIT_OUTCOME_HELD,
}


def edit_ref(info: EditInfo | None) -> pb.EditRef | None:
    if info is None:
        return None
    return pb.EditRef(
        edit_id=info.edit_id,
        prototype_id=info.prototype_id,
        prototype_version=info.prototype_version,
        source=info.source,
        payload_bytes=info.payload_bytes,
        applied_at_ms=info.applied_at_ms,
    )


def edit_cost(cost: FetchResult | None) -> pb.EditCost | None:
    if cost is None:
        return None
    return pb.EditCost(
        bytes_up=cost.bytes_up,
        bytes_down=cost.bytes_down,
        payload_bytes=cost.payload_bytes,
        prototype_bytes=cost.prototype_bytes,
        cloud_ms=cost.cloud_ms,
        device_decode_us=cost.decode_us,
        device_apply_us=cost.apply_us,
        device_states_us=cost.states_us,
    )


class RecommendationServicer(pb_grpc.RecommendationServiceServicer):
    """The RecommendationService over one :class:`DeviceEngine` (None while loading:
    every call is then UNAVAILABLE)."""

    def __init__(self, engine: DeviceEngine | None = None) -> None:
        self._engine = engine

    @property
    def engine(self) -> DeviceEngine:
        if self._engine is None:
            raise NotReadyError("the device is still loading its ranker; retry shortly")
        return self._engine

    @engine.setter
    def engine(self, engine: DeviceEngine | None) -> None:
        self._engine = engine

    async def Recommend(
        self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecommendResponse:
        rec = await self.engine.recommend(
            request.user_id,
            request.k,
            candidates=list(request.candidates.item_ids)
            if request.HasField("candidates")
            else None,
            include_seen=request.include_seen,
            base_model=request.base_model,
            probes=list(request.probe_item_ids),
        )
        mode = MODES[rec.mode]
        return pb.RecommendResponse(
            items=[
                pb.ScoredItem(item_id=i, score=s)
                for i, s in zip(rec.item_ids, rec.scores, strict=True)
            ],
            mode=mode,
            fallback=rec.mode in (FALLBACK_BASE, FALLBACK_LAST_EDIT),
            edit=edit_ref(rec.edit),
            note=rec.note,
            probe_scores=rec.probe_scores,
            probe_ranks=rec.probe_ranks,
        )

    async def RecordEvent(
        self, request: pb.RecordEventRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordEventResponse:
        res = await self.engine.record_event(
            request.user_id,
            request.item_id,
            request.timestamp,
            wait_for_edit=request.wait_for_edit,
        )
        return pb.RecordEventResponse(
            history_length=res.history_length,
            shift_score=res.shift_score,
            threshold=res.threshold,
            edit_requested=res.requested,
            outcome=OUTCOMES[res.outcome],
            mode=MODES[res.mode],
            edit=edit_ref(res.edit),
            new_user=res.new_user,
            cost=edit_cost(res.cost),
            arm=res.arm,
        )

    async def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetStatusResponse:
        st = await self.engine.status(request.user_id or None)
        user = st.pop("user")
        st.pop("durability")  # not in the proto (yet): engine.status() and the logs have it
        reply = pb.GetStatusResponse(**st)
        if user is not None:
            reply.user.CopyFrom(
                pb.UserStatus(
                    user_id=user["user_id"],
                    history_length=user["history_length"],
                    mode=MODES[user["mode"]],
                    edit=edit_ref(user["edit"]),
                    events_since_edit=user["events_since_edit"],
                    last_shift_score=user["last_shift_score"],
                    bytes_up=user["bytes_up"],
                    bytes_down=user["bytes_down"],
                    note=user["note"],
                    arm=user["arm"],
                    adaptive=user["adaptive"],
                    trigger=user["trigger"],
                    gate_budget=user["gate_budget"],
                    gate_threshold=user["gate_threshold"],
                    events_since_apply=user["events_since_apply"],
                    edit_age_seconds=user["edit_age_seconds"],
                    edit_age_clock=user["edit_age_clock"],
                    fit_mrr=user["fit_mrr"],
                    fit_mean_rank=user["fit_mean_rank"],
                    fit_clicks=user["fit_clicks"],
                    guard_clicks=user["guard_clicks"],
                    guard_mean_gain_diff=user["guard_mean_gain_diff"],
                    held_by=user["held_by"],
                )
            )
        return reply

    async def ApplyEdit(
        self, request: pb.ApplyEditRequest, context: grpc.aio.ServicerContext
    ) -> pb.ApplyEditResponse:
        info, mode = await self.engine.apply_edit(
            request.user_id, request.edit_payload, request.source
        )
        return pb.ApplyEditResponse(edit=edit_ref(info), mode=MODES[mode])

    async def RequestEdit(
        self, request: pb.RequestEditRequest, context: grpc.aio.ServicerContext
    ) -> pb.RequestEditResponse:
        res = await self.engine.request_edit(request.user_id, wait_for_edit=request.wait_for_edit)
        return pb.RequestEditResponse(
            outcome=OUTCOMES[res.outcome],
            mode=MODES[res.mode],
            edit=edit_ref(res.edit),
            cost=edit_cost(res.cost),
            arm=res.arm,
        )
