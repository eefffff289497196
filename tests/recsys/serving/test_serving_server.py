"""ServerOptions: validated at construction, naming the field, the value and the range."""

from __future__ import annotations

import dataclasses

import pytest

from recsys.errors import ValidationError
from recsys.serving.server import DEFAULT_MAX_MESSAGE_BYTES, ServerOptions


def test_defaults_and_replace() -> None:
    opts = ServerOptions()
    assert (opts.host, opts.port, opts.max_message_bytes) == (
        "127.0.0.1",
        0,
        DEFAULT_MAX_MESSAGE_BYTES,
    )
    assert dataclasses.replace(opts, port=50051).port == 50051


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"port": 70000}, "ServerOptions: port: Input should be less than or equal to 65535"),
        ({"max_message_bytes": 10}, "max_message_bytes: Input should be greater than or equal"),
        ({"grace_s": -1.0}, "grace_s: Input should be greater than or equal to 0"),
        ({"max_concurrent_rpcs": 0}, "max_concurrent_rpcs: Input should be greater than or"),
        ({"tls_cert": "server.pem"}, "TLS needs both a certificate and a key"),
    ],
)
def test_bad_options_name_the_field(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValidationError) as err:
        ServerOptions(**kwargs)
    assert needle in str(err.value)
