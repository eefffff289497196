"""The client's dataclasses and enums keep up with the protos: a field or enum value the
servers add must reach the client's results (a KeyError or a silently dropped field
otherwise)."""

from __future__ import annotations

import dataclasses

import pytest

from recsys.client import results as r
from recsys.client.convert import edit_outcome, serving_mode
from recsys.rpc.device.v1 import recommendation_pb2 as pb


def test_every_edit_outcome_and_serving_mode_converts() -> None:
    for value in pb.EditOutcome.values():
        assert isinstance(edit_outcome(value, pb), r.EditOutcome)
    for value in pb.ServingMode.values():
        assert isinstance(serving_mode(value, pb), r.ServingMode)


@pytest.mark.parametrize(
    ("result", "message"),
    [(r.DeviceStatus, pb.GetStatusResponse), (r.UserStatus, pb.UserStatus)],
)
def test_status_results_carry_every_proto_field(result: type, message: type) -> None:
    fields = {f.name for f in dataclasses.fields(result)}
    assert {f.name for f in message.DESCRIPTOR.fields} <= fields
