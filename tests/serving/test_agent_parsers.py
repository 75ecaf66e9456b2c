"""vLLM's reasoning and tool-call parsers of each catalog family, on crafted model outputs.

No engine: the parsers the operator configures per family (gemma4 -> `gemma4` tools and
reasoning, qwen3_moe -> `hermes` tools + `qwen3` reasoning, mixtral -> `mistral` tools) are
loaded from vLLM's registries by name and fed text tokenized by the tiny checkpoint's tokenizer,
extended with the families' think and tool-call tokens (as real checkpoints have them), both
whole (non-streaming) and one token at a time (streaming, as the server detokenizes).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from moe_serving.tinymodel import Arch

FAMILY_TOKENS = [
    # Gemma 4: channel (thinking) and tool-call markers, string delimiter.
    "<|channel>",
    "<channel|>",
    "<|tool_call>",
    "<tool_call|>",
    '<|"|>',
    # Qwen3: think block and Hermes-style tool calls.
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    # Mistral / Mixtral.
    "[TOOL_CALLS]",
]
WEATHER: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]


@pytest.fixture(scope="module")
def tokenizer(tiny_models: Callable[[Arch], Path]) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models("gemma4"))
    tok.add_special_tokens({"additional_special_tokens": FAMILY_TOKENS})
    for marker in FAMILY_TOKENS:  # each marker is one token, as in the real vocabularies
        assert len(tok(marker, add_special_tokens=False).input_ids) == 1
    return tok


def _request(**kwargs: Any) -> Any:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "weather?"}], **kwargs}
    )


def _token_deltas(tokenizer: Any, text: str) -> list[tuple[str, str, str, list[int], list[int]]]:
    """(previous_text, current_text, delta_text, previous_ids, current_ids) per generated token."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    steps = []
    previous = ""
    for i in range(len(ids)):
        current = tokenizer.decode(ids[: i + 1], skip_special_tokens=False)
        steps.append((previous, current, current[len(previous) :], ids[:i], ids[: i + 1]))
        previous = current
    assert previous == text  # the crafted output round-trips through the tokenizer
    return steps


def _reasoning_parser(name: str, tokenizer: Any, thinking: bool | None) -> Any:
    from vllm.reasoning import ReasoningParserManager

    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    return ReasoningParserManager.get_reasoning_parser(name)(tokenizer, chat_template_kwargs=kwargs)


REASONING_CASES = [
    # (parser, enable_thinking, model output, expected reasoning, expected content)
    (
        "gemma4",
        True,
        "<|channel>thought\nI check the map.<channel|>Paris is sunny.",
        "I check the map.",
        "Paris is sunny.",
    ),
    ("gemma4", False, "Paris is sunny.", None, "Paris is sunny."),
    (
        "qwen3",
        None,
        "<think>\nI check the map.\n</think>\n\nParis is sunny.",
        "I check the map.",
        "Paris is sunny.",
    ),
    # Qwen3 templates open <think> in the prompt: the output starts inside the reasoning.
    (
        "qwen3",
        True,
        "I check the map.</think>Paris is sunny.",
        "I check the map.",
        "Paris is sunny.",
    ),
    ("qwen3", False, "Paris is sunny.", None, "Paris is sunny."),
]


@pytest.mark.parametrize(("name", "thinking", "output", "reasoning", "content"), REASONING_CASES)
def test_reasoning_is_split_from_the_answer(
    tokenizer: Any,
    name: str,
    thinking: bool | None,
    output: str,
    reasoning: str | None,
    content: str,
) -> None:
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    request = _request(chat_template_kwargs=kwargs)
    got_reasoning, got_content = _reasoning_parser(name, tokenizer, thinking).extract_reasoning(
        output, request
    )
    assert (got_reasoning or "").strip() == (reasoning or "")
    assert (got_content or "").strip() == content

    parser = _reasoning_parser(name, tokenizer, thinking)
    streamed_reasoning, streamed_content = "", ""
    for previous, current, delta, previous_ids, current_ids in _token_deltas(tokenizer, output):
        message = parser.extract_reasoning_streaming(
            previous, current, delta, previous_ids, current_ids, current_ids[len(previous_ids) :]
        )
        if message is not None:
            streamed_reasoning += message.reasoning or ""
            streamed_content += message.content or ""
    final = parser.finish_streaming()
    if final is not None:
        streamed_reasoning += final.reasoning or ""
        streamed_content += final.content or ""
    assert streamed_reasoning.strip() == (reasoning or "")
    assert streamed_content.strip() == content
    # Thinking markers never leak into what the client sees.
    for marker in ("<think>", "</think>", "<|channel>", "<channel|>"):
        assert marker not in streamed_content + streamed_reasoning


TOOL_CASES = [
    (
        "gemma4",
        '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>',
    ),
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n'
        "</tool_call>",
    ),
    (
        "mistral",
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]',
    ),
]


def _tool_parser(name: str, tokenizer: Any) -> Any:
    from vllm.tool_parsers import ToolParserManager

    return ToolParserManager.get_tool_parser(name)(tokenizer, None)


@pytest.mark.parametrize(("name", "output"), TOOL_CASES)
def test_tool_call_is_parsed_into_schema_valid_arguments(
    tokenizer: Any, name: str, output: str
) -> None:
    request = _request(tools=TOOLS, tool_choice="auto")
    info = _tool_parser(name, tokenizer).extract_tool_calls(output, request)
    assert info.tools_called
    assert [c.function.name for c in info.tool_calls] == ["get_weather"]
    arguments = json.loads(info.tool_calls[0].function.arguments)
    jsonschema.validate(arguments, WEATHER)
    assert arguments == {"city": "Paris", "days": 3}
    assert not (info.content or "").strip()


@pytest.mark.parametrize(("name", "output"), TOOL_CASES[:2])
def test_streamed_tool_call_deltas_assemble_to_the_call(
    tokenizer: Any, name: str, output: str
) -> None:
    request = _request(tools=TOOLS, tool_choice="auto")
    parser = _tool_parser(name, tokenizer)
    names: list[str] = []
    arguments = ""
    content = ""
    for previous, current, delta, previous_ids, current_ids in _token_deltas(tokenizer, output):
        message = parser.extract_tool_calls_streaming(
            previous,
            current,
            delta,
            previous_ids,
            current_ids,
            current_ids[len(previous_ids) :],
            request,
        )
        if message is None:
            continue
        content += message.content or ""
        for call in message.tool_calls or []:
            assert call.index == 0
            if call.function and call.function.name:
                names.append(call.function.name)
            arguments += (call.function.arguments or "") if call.function else ""
    final = parser.finish_streaming() if hasattr(parser, "finish_streaming") else None
    for call in (final.tool_calls or []) if final is not None else []:
        arguments += (call.function.arguments or "") if call.function else ""
    assert names == ["get_weather"]
    assert json.loads(arguments) == {"city": "Paris", "days": 3}
    assert not content.strip()


def test_plain_answer_is_not_a_tool_call(tokenizer: Any) -> None:
    request = _request(tools=TOOLS, tool_choice="auto")
    for name, _ in TOOL_CASES:
        info = _tool_parser(name, tokenizer).extract_tool_calls("It is sunny in Paris.", request)
        assert not info.tools_called and info.content == "It is sunny in Paris."


def test_reasoning_is_also_sent_as_reasoning_content() -> None:
    from moe_serving.engine import sse_with_reasoning_content, with_reasoning_content

    body = {"choices": [{"message": {"content": None, "reasoning": "think"}}]}
    assert with_reasoning_content(body)["choices"][0]["message"]["reasoning_content"] == "think"
    chunk = 'data: {"choices": [{"delta": {"reasoning": "th"}}]}\n\n'
    out = sse_with_reasoning_content(chunk)
    assert out.endswith("\n\n")
    assert json.loads(out.split("\n")[0][6:])["choices"][0]["delta"]["reasoning_content"] == "th"
    # Chunks without reasoning, the end marker and non-JSON pass through untouched.
    for same in ('data: {"choices": [{"delta": {"content": "a"}}]}\n\n', "data: [DONE]\n\n"):
        assert sse_with_reasoning_content(same) == same
    broken = 'data: {"reasoning": oops\n\n'
    assert sse_with_reasoning_content(broken) == broken


def test_buffered_forced_tool_call_stream_is_a_well_formed_chunk_sequence() -> None:
    from moe_serving.tool_choice import SUFFIX, as_stream, buffers_stream

    class Request:
        stream, tools, tool_choice = True, [{"type": "function"}], "required"

    assert buffers_stream("gemma4" + SUFFIX, Request())
    assert not buffers_stream("hermes", Request())  # constrained natively, streams natively
    Request.tool_choice = "auto"
    assert not buffers_stream("gemma4" + SUFFIX, Request())
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    body = {
        "id": "chatcmpl-1",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
    }
    events = as_stream(body, include_usage=True)
    assert events[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-1" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    (streamed,) = chunks[1]["choices"][0]["delta"]["tool_calls"]
    assert streamed == {"index": 0, **call}
    assert chunks[2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[3]["usage"]["completion_tokens"] == 5 and chunks[3]["choices"] == []
    assert len(as_stream(body, include_usage=False)) == len(events) - 1
