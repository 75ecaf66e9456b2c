"""What the agent-workload tests send and check (test_agent_workloads.py, and
test_agent_native_parsers.py, which reuses its tools and schemas): tools with bounded JSON
schemas, the request fields that switch thinking off, the logit bias that pushes whitespace-only
tokens away, the schema check of a tool call and the calls of a streamed chat (HTTP, gRPC)
(test_agent_workloads.py says why each is so). Private to tests/serving/ (imported by name, as
pytest puts this folder on the path)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

from tests.support.served import Served

NO_THINKING: dict[str, Any] = {"chat_template_kwargs": {"enable_thinking": False}}
MESSAGES: list[Any] = [{"role": "user", "content": "What is the weather in Paris this week?"}]
# Bounded strings, enums and integer ranges: a random model still reaches the end of the object.
WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TIME_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}


def _tool(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    # strict: OpenAI's switch for "arguments must follow the schema"; vLLM then constrains them.
    return {
        "type": "function",
        "function": {"name": name, "description": name, "parameters": schema, "strict": True},
    }


TOOLS = [_tool("get_weather", WEATHER_SCHEMA), _tool("get_time", TIME_SCHEMA)]
SCHEMAS = {"get_weather": WEATHER_SCHEMA, "get_time": TIME_SCHEMA}
MAX_TOKENS = 400


@dataclass(kw_only=True)
class AgentApp(Served):
    """A served app with the logit bias of its checkpoint's whitespace-only tokens."""

    no_whitespace: dict[str, int]  # logit_bias pushing whitespace-only tokens away


def whitespace_bias(model_dir: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    bias = {str(i): -100 for i in range(len(tok)) if not str(tok.decode([i])).strip()}
    assert bias  # the byte-level vocabulary has space, tab and newline tokens
    return bias


def assert_valid_calls(calls: list[tuple[str, str]], only: str | None = None) -> None:
    """Each (name, arguments JSON) is a call of a declared tool with schema-valid arguments."""
    assert calls, "no tool call in the response"
    for name, arguments in calls:
        assert name in SCHEMAS and (only is None or name == only)
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def streamed_grpc_calls(chunks: Iterable[Any]) -> list[tuple[str, str]]:
    """(name, arguments JSON) of each tool call, assembled from the deltas of a gRPC Generate
    stream of a chat."""
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    for chunk in chunks:
        for delta in json.loads(chunk.tool_calls_json) if chunk.tool_calls_json else []:
            function = delta.get("function") or {}
            if function.get("name"):
                names[delta["index"]] = function["name"]
            arguments[delta["index"]] = arguments.get(delta["index"], "") + (
                function.get("arguments") or ""
            )
    return [(names[i], arguments[i]) for i in sorted(names)]


def streamed_chat_calls(
    stream: Iterable[Any],
) -> tuple[list[tuple[str, str]], str | None, list[Any]]:
    """The tool calls (name, arguments JSON) assembled from the chunks of a streamed chat
    completion (openai client), its finish reason, and every delta (what came instead)."""
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    finish: str | None = None
    seen: list[Any] = []
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            seen.append(choice.delta.model_dump(exclude_none=True))
            for delta in choice.delta.tool_calls or []:
                if delta.function and delta.function.name:
                    names[delta.index] = delta.function.name
                if delta.function and delta.function.arguments:
                    arguments[delta.index] = (
                        arguments.get(delta.index, "") + delta.function.arguments
                    )
    return [(names[i], arguments[i]) for i in sorted(names)], finish, seen
