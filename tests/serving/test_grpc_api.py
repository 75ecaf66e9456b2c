"""gRPC <-> OpenAI conversions, and the committed generated modules being up to date."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moe_serving import grpc_api, grpc_codegen
from moe_serving.proto import inference_pb2 as pb


def test_completion_body_sets_only_given_fields() -> None:
    request = pb.CompleteRequest(
        model="m",
        prompt="hi",
        return_token_ids=True,
        sampling=pb.SamplingParams(max_tokens=5, temperature=0.0, stop=["\n"]),
    )
    body = grpc_api.completion_body(request)
    assert body == {
        "prompt": "hi",
        "model": "m",
        "max_tokens": 5,
        "temperature": 0.0,  # explicitly set zero is kept (proto3 optional)
        "stop": ["\n"],
        "return_token_ids": True,
    }
    streamed = grpc_api.completion_body(pb.CompleteRequest(prompt_token_ids=[5, 6]), stream=True)
    assert streamed["prompt"] == [5, 6] and streamed["stream"] is True
    assert streamed["stream_options"] == {"include_usage": True}


def test_chat_body_carries_json_fields_for_tools_and_formats() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    request = pb.ChatRequest(
        messages=[
            pb.ChatMessage(role="user", content="hi"),
            pb.ChatMessage(role="assistant", content="", tool_calls_json="[]"),
        ],
        tools_json=json.dumps(tools),
        tool_choice_json='"auto"',
        response_format_json='{"type": "json_object"}',
        extra_json='{"top_logprobs": 2}',
    )
    body = grpc_api.chat_body(request)
    assert body["messages"][0] == {"role": "user", "content": "hi"}
    assert body["messages"][1]["tool_calls"] == []
    assert body["tools"] == tools and body["tool_choice"] == "auto"
    assert body["response_format"] == {"type": "json_object"} and body["top_logprobs"] == 2


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (pb.CompleteRequest(prompt="a", prompt_token_ids=[1]), "either prompt or prompt_token_ids"),
        (pb.CompleteRequest(prompt="a", extra_json="{"), "extra_json is not valid JSON"),
        (pb.CompleteRequest(prompt="a", extra_json="[1]"), "extra_json must be JSON of type dict"),
        (pb.CompleteRequest(prompt="a", extra_json='{"prompt": "b"}'), "repeats fields"),
    ],
)
def test_invalid_completion_requests_say_what_is_wrong(
    request_: pb.CompleteRequest, message: str
) -> None:
    with pytest.raises(grpc_api.InvalidRequest, match=message):
        grpc_api.completion_body(request_)


def test_chat_message_without_role_is_invalid() -> None:
    with pytest.raises(grpc_api.InvalidRequest, match=r"messages\[0\].role must be set"):
        grpc_api.chat_body(pb.ChatRequest(messages=[pb.ChatMessage(content="x")]))


def test_responses_and_stream_chunks_convert() -> None:
    body = {
        "id": "cmpl-1",
        "model": "m",
        "created": 7,
        "choices": [{"index": 0, "text": "ab", "token_ids": [1, 2], "finish_reason": "length"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
    response = grpc_api.completion_response(body)
    assert list(response.choices[0].token_ids) == [1, 2] and response.usage.total_tokens == 5
    chat = grpc_api.chat_response(
        {"choices": [{"message": {"role": "assistant", "content": "yo"}, "finish_reason": "stop"}]}
    )
    assert (chat.choices[0].role, chat.choices[0].text) == ("assistant", "yo")

    sse = (
        'data: {"id": "c", "choices": [{"index": 0, "delta": {"content": "x"}, "token_ids": [9]}]}'
        '\n\ndata: {"id": "c", "choices": [], "usage": {"prompt_tokens": 1, '
        '"completion_tokens": 1, "total_tokens": 2}}\n\ndata: [DONE]\n\n'
    )
    payloads = grpc_api.parse_sse(sse)
    assert len(payloads) == 2
    first = grpc_api.stream_chunks(payloads[0])
    assert [(c.text, list(c.token_ids)) for c in first] == [("x", [9])]
    (usage_chunk,) = grpc_api.stream_chunks(payloads[1])
    assert usage_chunk.usage.total_tokens == 2
    assert grpc_api.error_message({"error": {"message": "bad"}}) == "bad"
    assert grpc_api.error_message(payloads[0]) is None
    assert not usage_chunk.usage.HasField("cost_usd")  # no price: no cost, not a cost of 0


def test_the_request_cost_in_usage_reaches_both_grpc_shapes() -> None:
    """usage.cost_usd and its parts (the engine's extension fields, moe_serving.request_cost)
    land in pb.Usage: on Complete / Chat responses and on Generate's last chunk."""
    usage = {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "cost_usd": 3e-6,
        "prompt_cost_usd": 1e-6,
        "output_cost_usd": 2e-6,
    }
    response = grpc_api.completion_response({"choices": [], "usage": usage})
    (last,) = grpc_api.stream_chunks({"id": "c", "choices": [], "usage": usage})
    for got in (response.usage, last.usage):
        assert (got.cost_usd, got.prompt_cost_usd, got.output_cost_usd) == (3e-6, 1e-6, 2e-6)


def test_generated_modules_are_up_to_date(tmp_path: Path) -> None:
    """`python -m moe_serving.grpc_codegen` reproduces the committed files byte for byte."""
    package = Path(grpc_codegen.__file__).resolve().parent
    root = tmp_path / "root"
    shutil.copytree(package / "proto", root / "moe_serving" / "proto")
    for generated in (root / "moe_serving" / "proto").glob("inference_pb2*"):
        generated.unlink()
    written = grpc_codegen.generate(root)
    for path in written:
        committed = package / "proto" / path.name
        assert path.read_text() == committed.read_text(), f"{committed} is stale: run make proto"


def test_generated_classes_report_their_package_module() -> None:
    """Ray Serve pickles messages: their classes must name an importable module."""
    assert pb.CompleteRequest.__module__ == "moe_serving.proto.inference_pb2"
    assert pb.DESCRIPTOR.services_by_name["InferenceService"].full_name == (
        "moe.inference.v1.InferenceService"
    )
