"""Constrained `tool_choice: required` / named function for every tool-call parser.

vLLM constrains decoding for required and named tool choice in one of two ways: parsers with a
structural tag (hermes, llama, ...) get xgrammar's grammar for their native syntax; parsers
that declare `supports_required_and_named` get a JSON schema of the calls and vLLM's generic
JSON handling; a few constrain in their own `adjust_request` (vLLM 0.32's `mistral`: a guided
JSON schema of its pre-v11 call format, or its grammar on Mistral tokenizers that have one).
The rest leave required/named calls to the model's native syntax, unconstrained (vLLM 0.32's
`gemma4`), so a model that does not follow it (any small or fine-tuned one) returns text instead
of a call, or invalid arguments.

`constrained_parser` registers, under a derived name, a subclass of such a parser that takes
vLLM's generic JSON path for required/named tool choice (arguments guaranteed to validate
against each function's schema) and keeps the parser's own behaviour for `auto`. Parsers that
already constrain are returned unchanged. Runs in the engine replica, before vLLM's serving
layer is built.
"""

from __future__ import annotations

from typing import Any

SUFFIX = "+json-forced"
# Parsers that declare neither flag but constrain required/named themselves (read in vLLM 0.32's
# source; tests/serving/test_agent_native_parsers.py checks it on a tiny Mixtral): their own
# constraint keeps the model's native call format, which a real model follows best.
CONSTRAIN_THEMSELVES = frozenset({"mistral"})


def _forced(request: Any) -> bool:
    """required or a named function."""
    choice = getattr(request, "tool_choice", None)
    return choice == "required" or (choice is not None and not isinstance(choice, str))


def needs_forcing(name: str, parser_cls: type) -> bool:
    """vLLM would leave required/named calls of this parser unconstrained. Unknown parsers
    without either flag are forced: a JSON-constrained call beats an unconstrained one."""
    if name in CONSTRAIN_THEMSELVES:
        return False
    return not getattr(parser_cls, "supports_required_and_named", True) and (
        getattr(parser_cls, "structural_tag_model", None) is None
    )


def constrained_parser(name: str | None) -> str | None:
    """The tool-call parser name to give vLLM for `name` (registering the variant if needed)."""
    if not name:
        return name
    from vllm.tool_parsers import ToolParserManager
    from vllm.tool_parsers.abstract_tool_parser import ToolParser

    base = ToolParserManager.get_tool_parser(name)
    if not needs_forcing(name, base):
        return name
    derived = name + SUFFIX

    def adjust_request(self: Any, request: Any) -> Any:
        if request.tools and _forced(request):
            # ToolParser's own version: a JSON schema of the calls as structured output.
            return ToolParser.adjust_request(self, request)
        return base.adjust_request(self, request)

    variant = type(
        f"JsonForced{base.__name__}",
        (base,),
        {
            "supports_required_and_named": True,
            "adjust_request": adjust_request,
            "__doc__": f"{base.__name__} with JSON-constrained required/named tool choice.",
        },
    )
    ToolParserManager.register_module(name=derived, force=True, module=variant)
    return derived


# ---- streaming ---------------------------------------------------------------------------------
# vLLM's streaming path for these parsers is engine-based: it feeds the generated text to the
# parser's own engine, which does not read the JSON calls the constrained path produces (they
# vanish from the stream). Forced calls on a forcing variant are therefore generated in one piece
# and sent as a short, well-formed stream: the role, the calls, the finish reason (and usage).


def buffers_stream(parser_name: str | None, request: Any) -> bool:
    """A streamed chat request whose required/named calls come from a forcing variant."""
    return bool(
        parser_name
        and parser_name.endswith(SUFFIX)
        and getattr(request, "stream", False)
        and getattr(request, "tools", None)
        and _forced(request)
    )


def as_stream(body: dict[str, Any], include_usage: bool) -> list[str]:
    """SSE chunks (OpenAI `chat.completion.chunk`) carrying a whole chat completion `body`."""
    import json

    base = {
        "id": body.get("id"),
        "object": "chat.completion.chunk",
        "created": body.get("created"),
        "model": body.get("model"),
    }
    chunks: list[dict[str, Any]] = []
    for choice in body.get("choices") or ():
        index = choice.get("index", 0)
        message = choice.get("message") or {}

        def chunk(delta: dict[str, Any], finish: Any = None, i: int = index) -> dict[str, Any]:
            return {**base, "choices": [{"index": i, "delta": delta, "finish_reason": finish}]}

        chunks.append(chunk({"role": "assistant", "content": ""}))
        delta: dict[str, Any] = {}
        for key in ("content", "reasoning", "reasoning_content"):
            if message.get(key):
                delta[key] = message[key]
        calls = message.get("tool_calls") or []
        if calls:
            delta["tool_calls"] = [
                {
                    "index": k,
                    "id": call.get("id"),
                    "type": "function",
                    "function": {
                        "name": (call.get("function") or {}).get("name"),
                        "arguments": (call.get("function") or {}).get("arguments", ""),
                    },
                }
                for k, call in enumerate(calls)
            ]
        if delta:
            chunks.append(chunk(delta))
        chunks.append(chunk({}, choice.get("finish_reason")))
    if include_usage and body.get("usage") is not None:
        chunks.append({**base, "choices": [], "usage": body["usage"]})
    return [f"data: {json.dumps(c, ensure_ascii=False)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]
