"""The input checks the reliability fuzz forced (no engine: pure functions)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from moe_serving import grpc_api
from moe_serving.body_checks import text_problem
from moe_serving.engine import _is_empty_prompt


@pytest.mark.parametrize(
    ("prompt", "empty"),
    [
        (None, True),
        ("", True),
        ([], True),
        ([[]], True),
        (["a", ""], True),
        ("x", False),
        ([5, 6, 7], False),  # token ids: one non-empty prompt (was refused as empty)
        ([[1, 2], [3]], False),
        (["a", "b"], False),
    ],
)
def test_empty_prompt(prompt: Any, empty: bool) -> None:
    assert _is_empty_prompt(prompt) is empty


def test_lone_surrogates_are_a_client_problem() -> None:
    body = json.loads(b'{"prompt": "ok \\ud800", "messages": []}')
    problem = text_problem(body)
    assert problem is not None and "\\ud800" in problem and "not valid Unicode" in problem
    assert text_problem({"prompt": "émoji 🚀 \u0000", "n": [1, {"a": None}]}) is None


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        ({"error": {"message": "Token id 9 is out of vocabulary", "code": 400}}, 400),
        ({"error": {"message": "x", "code": "404"}}, 404),
        ({"error": {"message": "boom", "code": 500}}, 500),
        ({"error": {"message": "engine died, retry", "code": 503}}, 503),
        ({"error": {"message": "gateway", "code": 502}}, 500),
        ({"error": {"message": "no code"}}, 500),
        ({"error": {"message": "odd", "code": "n/a"}}, 500),
    ],
)
def test_mid_stream_error_status(payload: dict[str, Any], status: int) -> None:
    # gRPC Generate maps a client error found mid-stream to INVALID_ARGUMENT (a dead engine to
    # UNAVAILABLE), not INTERNAL.
    assert grpc_api.error_status(payload) == status
