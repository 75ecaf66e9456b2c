"""Agent workloads on the served app: tool calling, structured outputs, thinking on/off.

One Ray cluster and one app for the module: the tiny Qwen3-MoE checkpoint served with the
parsers the catalog gives that family (`hermes` tool calls, `qwen3` reasoning), which the
replica hands to vLLM's OpenAI layer with `enable_auto_tool_choice`. Weights are random, so
the model never *chooses* a tool: `auto` is only checked for an accepted request with a valid
response shape. What random weights cannot fake is the constrained decoding: `required` and
named tool choice (with `strict` tools) and `json_schema` outputs must validate against their
JSON schema, through the `openai` client over HTTP and through the gRPC stub.

Random weights favour whitespace, which JSON grammars allow anywhere and without bound (vLLM's
`disable_any_whitespace` does not reach the structural tags of tool calls): structured requests
bias whitespace-only tokens away (`logit_bias`), so the object ends within `max_tokens`; the
grammar still decides what is valid. Structured requests also switch thinking off
(`chat_template_kwargs.enable_thinking=False`): with a reasoning parser, vLLM constrains only
the answer, after the reasoning ends, and a random model never ends its reasoning.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import openai
import pytest
from agent_tools import (
    MAX_TOKENS,
    MESSAGES,
    NO_THINKING,
    TIME_SCHEMA,
    TOOLS,
    WEATHER_SCHEMA,
    AgentApp,
    assert_valid_calls,
    streamed_chat_calls,
    streamed_grpc_calls,
    whitespace_bias,
)

from moe_serving.proto import inference_pb2 as pb
from moe_serving.tinymodel import Arch
from tests.support.appconfig import tiny_app_config
from tests.support.served import running_app

pytestmark = pytest.mark.engine

MODEL = "tiny-agent"


@pytest.fixture(scope="module")
def served(tiny_models: Callable[[Arch], Path]) -> Iterator[AgentApp]:
    model_dir = tiny_models("qwen3_moe")
    config = tiny_app_config(
        model_dir,
        "moe-agent-test",
        served_model_name=MODEL,
        # What the operator fills from the catalog for qwen3_moe.
        tool_call_parser="hermes",
        reasoning_parser="qwen3",
    )
    bias = whitespace_bias(model_dir)
    with running_app(config, "moe-agent-tests", AgentApp, no_whitespace=bias) as served:
        yield served


def _chat(served: AgentApp, structured: bool = True, **kwargs: Any) -> Any:
    extra = {**NO_THINKING, **kwargs.pop("extra_body", {})}
    if structured:
        extra["logit_bias"] = served.no_whitespace
    return served.client(max_retries=0).chat.completions.create(
        model=MODEL,
        messages=kwargs.pop("messages", MESSAGES),
        temperature=0,
        max_tokens=kwargs.pop("max_tokens", MAX_TOKENS),
        extra_body=extra,
        **kwargs,
    )


# ---- tool calling over HTTP (openai client) ----------------------------------------------------


def test_required_tool_choice_gives_schema_valid_calls(served: AgentApp) -> None:
    chat = _chat(served, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    choice = chat.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert_valid_calls([(c.function.name, c.function.arguments) for c in calls])
    assert all(c.id and c.type == "function" for c in calls)


def test_named_tool_choice_calls_that_function(served: AgentApp) -> None:
    choice = _chat(
        served,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    ).choices[0]
    calls = choice.message.tool_calls or []
    assert_valid_calls([(c.function.name, c.function.arguments) for c in calls], only="get_time")


def test_streamed_required_tool_call_assembles_to_valid_arguments(served: AgentApp) -> None:
    stream = _chat(
        served, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, stream=True
    )
    calls, finish, _ = streamed_chat_calls(stream)
    assert finish == "tool_calls"
    assert_valid_calls(calls)


def test_auto_tool_choice_is_accepted_with_a_valid_shape(served: AgentApp) -> None:
    # Random weights do not decide to call a tool; the parser must still answer cleanly.
    for stream in (False, True):
        if stream:
            chunks = list(
                _chat(served, False, tools=TOOLS, tool_choice="auto", max_tokens=8, stream=True)
            )
            assert chunks[-1].choices[0].finish_reason in ("length", "stop", "tool_calls")
            continue
        choice = _chat(served, False, tools=TOOLS, tool_choice="auto", max_tokens=8).choices[0]
        assert choice.message.role == "assistant"
        assert choice.finish_reason in ("length", "stop", "tool_calls")
        assert choice.message.content or choice.message.tool_calls


def test_tool_result_turn_is_accepted(served: AgentApp) -> None:
    messages = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": '{"zone": "CET"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]
    choice = _chat(served, False, messages=messages, tools=TOOLS, max_tokens=4).choices[0]
    assert choice.finish_reason == "length"


def test_named_tool_choice_of_an_unknown_function_is_a_400(served: AgentApp) -> None:
    with pytest.raises(openai.BadRequestError):
        _chat(served, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})


# ---- structured outputs over HTTP --------------------------------------------------------------


def test_json_schema_response_validates(served: AgentApp) -> None:
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "weather", "schema": WEATHER_SCHEMA, "strict": True},
    }
    choice = _chat(served, response_format=response_format).choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content or ""), WEATHER_SCHEMA)


def test_json_object_response_is_constrained_to_an_object(served: AgentApp) -> None:
    # Any JSON object is allowed, so a random model may not close it within max_tokens: the
    # output must start as an object (the unconstrained answer does not), and parse when done.
    free = _chat(served, structured=False, max_tokens=12).choices[0].message.content or ""
    assert not free.lstrip().startswith("{")
    choice = _chat(served, response_format={"type": "json_object"}, max_tokens=100).choices[0]
    content = choice.message.content or ""
    assert content.lstrip().startswith("{")
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(content), dict)


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
        # Accepted by vLLM's grammar compiler; refused by our metaschema check.
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"minimum": "low"}}},
        {"type": "xml"},
    ],
)
def test_invalid_response_format_is_a_400(served: AgentApp, response_format: Any) -> None:
    with pytest.raises(openai.BadRequestError):
        _chat(served, response_format=response_format, max_tokens=4)


def test_invalid_tool_parameters_schema_is_a_400(served: AgentApp) -> None:
    bad_tool = {"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}
    with pytest.raises(openai.BadRequestError) as info:
        _chat(served, tools=[bad_tool], max_tokens=4)
    assert "tools[0].function.parameters is not a valid JSON Schema" in str(info.value)


# ---- reasoning (thinking on/off per request) ---------------------------------------------------


def test_thinking_switch_moves_output_between_reasoning_and_content(served: AgentApp) -> None:
    # qwen3 reasoning parser: with thinking on, everything before </think> is reasoning; a
    # random model never closes it, so all text is reasoning. With thinking off: all content.
    on = _chat(
        served,
        structured=False,
        max_tokens=8,
        extra_body={"chat_template_kwargs": {"enable_thinking": True}},
    )
    message = on.choices[0].message
    assert message.model_extra is not None and message.model_extra.get("reasoning")
    # Also under the name clients of OpenAI-compatible reasoning APIs read.
    assert message.model_extra.get("reasoning_content") == message.model_extra["reasoning"]
    assert not message.content
    stream = _chat(
        served,
        structured=False,
        max_tokens=8,
        stream=True,
        extra_body={"chat_template_kwargs": {"enable_thinking": True}},
    )
    deltas = [c.choices[0].delta for c in stream if c.choices]
    streamed = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    assert streamed == "".join((d.model_extra or {}).get("reasoning") or "" for d in deltas)
    assert streamed == message.model_extra["reasoning"]
    off = _chat(served, structured=False, max_tokens=8).choices[0].message
    assert off.content and not (off.model_extra or {}).get("reasoning")


# ---- the same over gRPC ------------------------------------------------------------------------


def _grpc_chat(
    served: AgentApp, extra: dict[str, Any] | None = None, **fields: Any
) -> pb.ChatRequest:
    fields.setdefault("chat_template_kwargs_json", json.dumps({"enable_thinking": False}))
    fields["extra_json"] = json.dumps({"logit_bias": served.no_whitespace, **(extra or {})})
    return pb.ChatRequest(
        model=MODEL,
        messages=[pb.ChatMessage(role="user", content=MESSAGES[0]["content"])],
        sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
        **fields,
    )


def test_grpc_named_tool_choice_gives_a_schema_valid_call(served: AgentApp) -> None:
    response = served.stub().Chat(
        _grpc_chat(
            served,
            tools_json=json.dumps(TOOLS),
            tool_choice_json=json.dumps({"type": "function", "function": {"name": "get_weather"}}),
        ),
        timeout=300,
    )
    calls = json.loads(response.choices[0].tool_calls_json)
    assert_valid_calls(
        [(c["function"]["name"], c["function"]["arguments"]) for c in calls], only="get_weather"
    )


def test_grpc_streamed_required_tool_call(served: AgentApp) -> None:
    request = _grpc_chat(
        served,
        {"parallel_tool_calls": False},
        tools_json=json.dumps(TOOLS),
        tool_choice_json='"required"',
    )
    chunks = served.stub().Generate(pb.GenerateRequest(chat=request), timeout=300)
    assert_valid_calls(streamed_grpc_calls(chunks))


def test_grpc_json_schema_response_validates(served: AgentApp) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "t", "schema": TIME_SCHEMA}}
    response = served.stub().Chat(
        _grpc_chat(served, response_format_json=json.dumps(response_format)), timeout=300
    )
    jsonschema.validate(json.loads(response.choices[0].text), TIME_SCHEMA)


def test_grpc_invalid_schema_is_invalid_argument(served: AgentApp) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    with pytest.raises(grpc.RpcError) as info:
        served.stub().Chat(_grpc_chat(served, response_format_json=json.dumps(bad)), timeout=300)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_grpc_thinking_on_returns_reasoning_content(served: AgentApp) -> None:
    request = _grpc_chat(served, chat_template_kwargs_json=json.dumps({"enable_thinking": True}))
    request.sampling.max_tokens = 8
    choice = served.stub().Chat(request, timeout=300).choices[0]
    assert choice.reasoning_content and not choice.text
