"""The cloud client against a real tiny cloud (in this process, loopback, tokens
required): an edit with its prototype, the prototypes, typed errors for bad input and a
foreign device id."""

from __future__ import annotations

import pytest

from recsys.client import (
    ClientOptions,
    CloudClient,
    GeneratedEdit,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from recsys.edit_payload import decode_payload
from recsys.serving.auth import issue_token


@pytest.fixture(scope="module")
def target(cloud) -> str:
    return f"127.0.0.1:{cloud.port}"


def test_generate_edit_and_prototypes(target, operator_token) -> None:
    with CloudClient(target, ClientOptions(timeout_s=20, token=operator_token)) as cloud:
        edit = cloud.generate_edit("phone-1", ["i1", "i2", "i3"], recent_timestamps=[1, 2, 3])
        assert isinstance(edit, GeneratedEdit) and edit.edit_id > 0 and edit.edit_payload
        decode_payload(edit.edit_payload)  # a well-formed RSE1 payload
        entries = cloud.list_prototypes()
        if edit.prototype_ref is not None:
            assert edit.prototype is not None and edit.prototype.ref == edit.prototype_ref
            assert edit.prototype_ref.id in {e.id for e in entries}
            again = cloud.generate_edit("phone-1", ["i1", "i2", "i3"],
                                        cached_prototype=edit.prototype_ref)  # fmt: skip
            assert again.prototype is None and again.edit_id > edit.edit_id
        for e in entries:  # the edits above may have refined it since it was listed
            proto = cloud.get_prototype(e.id)
            assert proto.ref.id == e.id and proto.ref.version >= e.current_version
        int8 = cloud.generate_edit("phone-1", ["i1", "i2"], payload_dtype="int8")
        assert len(int8.edit_payload) < len(edit.edit_payload) or edit.prototype_ref is None


def test_bad_input_and_tokens_are_typed_errors(target, operator_token, key) -> None:
    with CloudClient(target, ClientOptions(timeout_s=20, token=operator_token)) as cloud:
        with pytest.raises(InvalidArgumentError):
            cloud.generate_edit("phone-2", [])
        with pytest.raises(NotFoundError):
            cloud.generate_edit("phone-2", ["no-such-item"])
        with pytest.raises(InvalidArgumentError, match="payload_dtype"):
            cloud.generate_edit("phone-2", ["i1"], payload_dtype="fp8")
        with pytest.raises(NotFoundError):
            cloud.get_prototype(999)
    with (
        CloudClient(target, ClientOptions(timeout_s=20)) as anonymous,
        pytest.raises(UnauthenticatedError),
    ):
        anonymous.list_prototypes()
    own = issue_token(key[1], "phone-3", role="device")
    with CloudClient(target, ClientOptions(timeout_s=20, token=own)) as dev:
        assert dev.generate_edit("phone-3", ["i4", "i5"]).edit_payload
        with pytest.raises(PermissionDeniedError):
            dev.generate_edit("phone-4", ["i4", "i5"])
