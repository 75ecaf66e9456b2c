"""gRPC chat requests carry the agent fields (tools, tool choice, formats, thinking switch)."""

from __future__ import annotations

import json

import pytest

from moe_serving import grpc_api
from moe_serving.proto import inference_pb2 as pb


def test_chat_template_kwargs_reach_the_openai_body() -> None:
    request = pb.ChatRequest(
        messages=[pb.ChatMessage(role="user", content="hi")],
        tool_choice_json=json.dumps({"type": "function", "function": {"name": "f"}}),
        chat_template_kwargs_json='{"enable_thinking": false}',
    )
    body = grpc_api.chat_body(request, stream=True)
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert body["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert "chat_template_kwargs" not in grpc_api.chat_body(pb.ChatRequest())


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{", "chat_template_kwargs_json is not valid JSON"),
        ("[true]", "chat_template_kwargs_json must be JSON of type dict"),
    ],
)
def test_bad_chat_template_kwargs_are_invalid_requests(value: str, message: str) -> None:
    with pytest.raises(grpc_api.InvalidRequest, match=message):
        grpc_api.chat_body(pb.ChatRequest(chat_template_kwargs_json=value))


def test_chat_template_kwargs_cannot_also_come_through_extra_json() -> None:
    request = pb.ChatRequest(
        chat_template_kwargs_json='{"enable_thinking": true}',
        extra_json='{"chat_template_kwargs": {}}',
    )
    with pytest.raises(grpc_api.InvalidRequest, match="extra_json repeats"):
        grpc_api.chat_body(request)


def test_reasoning_and_tool_calls_come_back_in_their_own_fields() -> None:
    calls = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    body = {
        "choices": [
            {
                "message": {"role": "assistant", "content": None, "reasoning": "hmm"},
                "finish_reason": "length",
            },
            {
                "index": 1,
                "message": {"role": "assistant", "content": None, "tool_calls": calls},
                "finish_reason": "tool_calls",
            },
        ]
    }
    first, second = grpc_api.chat_response(body).choices
    assert first.reasoning_content == "hmm" and first.text == ""
    assert json.loads(second.tool_calls_json) == calls and second.finish_reason == "tool_calls"
