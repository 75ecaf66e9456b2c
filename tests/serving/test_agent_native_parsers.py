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
whitespace bias are those of test_agent_workloads.py (agent_tools.py; see why there).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import agent_tools as agent
import pytest

from moe_operator.catalog import ARCHITECTURES
from moe_serving.proto import inference_pb2 as pb
from moe_serving.tinymodel import Arch
from tests.support.appconfig import tiny_app_config
from tests.support.served import running_app

pytestmark = pytest.mark.engine

MODEL = "tiny-agent"
# Catalog family -> (tiny checkpoint architecture, the tool parser vLLM needs forcing for).
FAMILIES: dict[str, tuple[Arch, str]] = {
    "gemma4": ("gemma4", "gemma4"),
    "mixtral": ("mixtral", "mistral"),
}


def _chat(served: agent.AgentApp, **kwargs: Any) -> Any:
    extra = {**agent.NO_THINKING, "logit_bias": served.no_whitespace}
    return served.client(max_retries=0).chat.completions.create(
        model=MODEL,
        messages=agent.MESSAGES,
        temperature=0,
        max_tokens=agent.MAX_TOKENS,
        tools=agent.TOOLS,
        extra_body=extra,
        **kwargs,
    )


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def served(
    request: pytest.FixtureRequest, tiny_models: Callable[[Arch], Path]
) -> Iterator[agent.AgentApp]:
    arch, parser = FAMILIES[request.param]
    family = next(a for a in ARCHITECTURES.values() if a.family == request.param)
    model_dir = tiny_models(arch)
    config = tiny_app_config(
        model_dir,
        f"moe-{request.param}-agent-test",
        served_model_name=MODEL,
        # What the operator fills from the catalog for the family.
        tool_call_parser=family.tool_call_parser,
        reasoning_parser=family.reasoning_parser,
    )
    assert config.engine.tool_call_parser == parser
    bias = agent.whitespace_bias(model_dir)
    namespace = f"moe-{request.param}-agent-tests"
    with running_app(config, namespace, agent.AgentApp, no_whitespace=bias) as served:
        yield served


def test_required_tool_choice_gives_schema_valid_calls(served: agent.AgentApp) -> None:
    choice = _chat(served, tool_choice="required", parallel_tool_calls=False).choices[0]
    calls = choice.message.tool_calls or []
    agent.assert_valid_calls([(c.function.name, c.function.arguments) for c in calls])
    assert choice.finish_reason == "tool_calls"


def test_named_tool_choice_calls_that_function(served: agent.AgentApp) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    calls = _chat(served, tool_choice=named).choices[0].message.tool_calls or []
    agent.assert_valid_calls(
        [(c.function.name, c.function.arguments) for c in calls], only="get_time"
    )


def test_streamed_required_tool_call_assembles_to_valid_arguments(served: agent.AgentApp) -> None:
    stream = _chat(served, tool_choice="required", parallel_tool_calls=False, stream=True)
    calls, _, seen = agent.streamed_chat_calls(stream)
    assert calls, seen[:40]  # what came instead
    agent.assert_valid_calls(calls)


def _grpc_chat(served: agent.AgentApp, tool_choice: Any, extra: dict[str, Any]) -> pb.ChatRequest:
    return pb.ChatRequest(
        model=MODEL,
        messages=[pb.ChatMessage(role="user", content=agent.MESSAGES[0]["content"])],
        sampling=pb.SamplingParams(max_tokens=agent.MAX_TOKENS, temperature=0),
        tools_json=json.dumps(agent.TOOLS),
        tool_choice_json=json.dumps(tool_choice),
        chat_template_kwargs_json=json.dumps(agent.NO_THINKING["chat_template_kwargs"]),
        extra_json=json.dumps({"logit_bias": served.no_whitespace, **extra}),
    )


def test_grpc_named_tool_choice_gives_a_schema_valid_call(served: agent.AgentApp) -> None:
    stub = served.stub()
    named = {"type": "function", "function": {"name": "get_weather"}}
    response = stub.Chat(_grpc_chat(served, named, {}), timeout=300)
    calls = json.loads(response.choices[0].tool_calls_json)
    agent.assert_valid_calls(
        [(c["function"]["name"], c["function"]["arguments"]) for c in calls], only="get_weather"
    )


def test_grpc_streamed_required_tool_call(served: agent.AgentApp) -> None:
    stub = served.stub()
    request = _grpc_chat(served, "required", {"parallel_tool_calls": False})
    chunks = stub.Generate(pb.GenerateRequest(chat=request), timeout=300)
    agent.assert_valid_calls(agent.streamed_grpc_calls(chunks))
