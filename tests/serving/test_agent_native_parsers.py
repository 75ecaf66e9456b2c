"""`required` and named tool choice on the families whose tool parser vLLM does not constrain
with a structural tag: Gemma 4 (`gemma4` parser) and Mixtral (`mistral` parser).

vLLM 0.32's `gemma4` parser leaves required/named calls to the model's native syntax,
unconstrained (its adjust_request skips structured output), so a model that does not emit that
syntax returns text: moe_serving.tool_choice gives vLLM a variant of the parser that takes the
JSON-constrained path for required/named and keeps the parser for `auto`; streamed forced calls
are generated whole and sent as a short stream. The `mistral` parser constrains them itself (a
guided JSON schema of its pre-v11 format with a Hugging Face tokenizer) and is served as is.
This module serves each family's tiny checkpoint in turn (one engine at a time) with the parsers
the catalog gives the family (what the operator renders) and checks that the calls validate
against their schemas over HTTP (streaming and not) and gRPC (unary and streaming). Schemas and
whitespace bias are those of test_agent_workloads.py (see why there).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from local_app import running_app
from test_agent_workloads import (
    MAX_TOKENS,
    MESSAGES,
    NO_THINKING,
    TOOLS,
    _assert_valid_calls,
    _whitespace_bias,
)

from moe_operator.catalog import ARCHITECTURES
from moe_serving.config import AppConfig
from moe_serving.proto import inference_pb2 as pb
from moe_serving.proto import inference_pb2_grpc as pb_grpc
from moe_serving.tinymodel import Arch

pytestmark = pytest.mark.engine

MODEL = "tiny-agent"
# Catalog family -> (tiny checkpoint architecture, the tool parser vLLM needs forcing for).
FAMILIES: dict[str, tuple[Arch, str]] = {
    "gemma4": ("gemma4", "gemma4"),
    "mixtral": ("mixtral", "mistral"),
}


@dataclass
class Served:
    http: str
    grpc_target: str
    no_whitespace: dict[str, int]

    def chat(self, **kwargs: Any) -> Any:
        client = openai.OpenAI(base_url=f"{self.http}/v1", api_key="unused", max_retries=0)
        extra = {**NO_THINKING, "logit_bias": self.no_whitespace}
        return client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            temperature=0,
            max_tokens=MAX_TOKENS,
            tools=TOOLS,
            extra_body=extra,
            **kwargs,
        )


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def served(request: pytest.FixtureRequest, tiny_models: Callable[[Arch], Path]) -> Iterator[Served]:
    arch, parser = FAMILIES[request.param]
    family = next(a for a in ARCHITECTURES.values() if a.family == request.param)
    model_dir = tiny_models(arch)
    config = AppConfig.model_validate(
        {
            "deployment_name": f"moe-{request.param}-agent-test",
            "engine": {
                "model": str(model_dir),
                "served_model_name": MODEL,
                "dtype": "float32",
                "max_model_len": 2048,
                "enforce_eager": True,
                # What the operator fills from the catalog for the family.
                "tool_call_parser": family.tool_call_parser,
                "reasoning_parser": family.reasoning_parser,
            },
            "request_timeout_s": 300,
        }
    )
    assert config.engine.tool_call_parser == parser
    with running_app(config, f"moe-{request.param}-agent-tests") as (http, grpc_target):
        yield Served(http, grpc_target, _whitespace_bias(model_dir))


def test_required_tool_choice_gives_schema_valid_calls(served: Served) -> None:
    choice = served.chat(tool_choice="required", parallel_tool_calls=False).choices[0]
    calls = choice.message.tool_calls or []
    _assert_valid_calls([(c.function.name, c.function.arguments) for c in calls])
    assert choice.finish_reason == "tool_calls"


def test_named_tool_choice_calls_that_function(served: Served) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    calls = served.chat(tool_choice=named).choices[0].message.tool_calls or []
    _assert_valid_calls([(c.function.name, c.function.arguments) for c in calls], only="get_time")


def test_streamed_required_tool_call_assembles_to_valid_arguments(served: Served) -> None:
    stream = served.chat(tool_choice="required", parallel_tool_calls=False, stream=True)
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    seen: list[Any] = []  # what came instead, should no call come
    for chunk in stream:
        for choice in chunk.choices:
            seen.append(choice.delta.model_dump(exclude_none=True))
            for delta in choice.delta.tool_calls or []:
                if delta.function and delta.function.name:
                    names[delta.index] = delta.function.name
                if delta.function and delta.function.arguments:
                    arguments[delta.index] = (
                        arguments.get(delta.index, "") + delta.function.arguments
                    )
    assert names, seen[:40]
    _assert_valid_calls([(names[i], arguments[i]) for i in sorted(names)])


def _grpc_chat(served: Served, tool_choice: Any, extra: dict[str, Any]) -> pb.ChatRequest:
    return pb.ChatRequest(
        model=MODEL,
        messages=[pb.ChatMessage(role="user", content=MESSAGES[0]["content"])],
        sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
        tools_json=json.dumps(TOOLS),
        tool_choice_json=json.dumps(tool_choice),
        chat_template_kwargs_json=json.dumps(NO_THINKING["chat_template_kwargs"]),
        extra_json=json.dumps({"logit_bias": served.no_whitespace, **extra}),
    )


def test_grpc_named_tool_choice_gives_a_schema_valid_call(served: Served) -> None:
    stub = pb_grpc.InferenceServiceStub(grpc.insecure_channel(served.grpc_target))
    named = {"type": "function", "function": {"name": "get_weather"}}
    response = stub.Chat(_grpc_chat(served, named, {}), timeout=300)
    calls = json.loads(response.choices[0].tool_calls_json)
    _assert_valid_calls(
        [(c["function"]["name"], c["function"]["arguments"]) for c in calls], only="get_weather"
    )


def test_grpc_streamed_required_tool_call(served: Served) -> None:
    stub = pb_grpc.InferenceServiceStub(grpc.insecure_channel(served.grpc_target))
    request = _grpc_chat(served, "required", {"parallel_tool_calls": False})
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    for chunk in stub.Generate(pb.GenerateRequest(chat=request), timeout=300):
        for delta in json.loads(chunk.tool_calls_json) if chunk.tool_calls_json else []:
            function = delta.get("function") or {}
            if function.get("name"):
                names[delta["index"]] = function["name"]
            arguments[delta["index"]] = arguments.get(delta["index"], "") + (
                function.get("arguments") or ""
            )
    _assert_valid_calls([(names[i], arguments[i]) for i in sorted(names)])
