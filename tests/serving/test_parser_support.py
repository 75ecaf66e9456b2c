"""Optional parsers never stop a model from serving (issue #13): each catalog family's vLLM
tool-call and reasoning parsers against tiny tokenizers made with and without the family's
special tokens, no engine.

Grounded in vLLM 0.32's own startup check, vllm/parser/parser_manager.py
(`ParserManager.validate_parser_tokenizer`, called from `OpenAIServingChat.__init__` in
vllm/entrypoints/openai/chat_completion/serving.py): it builds the parser with the tokenizer
and raises `TypeError("--tool-call-parser X cannot be used with the tokenizer of ...")`, which
stops the replica's start (Ray Serve then retries it). The parsers that look tokens up are
vllm/tool_parsers/mistral_tool_parser.py ("could not locate the tool call token"),
deepseekv3_tool_parser.py ("could not locate tool call start/end tokens") and
vllm/reasoning/deepseek_r1_reasoning_parser.py (think start/end tokens). The oracle here is
vLLM's real parser classes built directly with the tokenizer.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from moe_operator.catalog import ARCHITECTURES
from moe_serving import parser_support
from moe_serving.config import AppConfig, EngineArgs
from moe_serving.tinymodel import PARSER_TOKENS, make_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: One catalog architecture per family (the parsers are per family).
FAMILIES = {a.family: a for a in ARCHITECTURES.values() if a.tool_call_parser}

#: What vLLM 0.32's parsers need from the tokenizer (see the module docstring): a plain
#: tokenizer loses these features, and only these.
NEEDS_TOKENS = {
    "gemma4": set(),
    "mixtral": {parser_support.TOOL_CALLING},
    "qwen3_moe": set(),
    "deepseek_v3": {parser_support.TOOL_CALLING, parser_support.REASONING},
}


@pytest.fixture(scope="module")
def tokenizer_for(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str | None], Any]:
    """family -> a tokenizer with its PARSER_TOKENS; None -> a plain one (made once each)."""
    from vllm.tokenizers import get_tokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    made: dict[str | None, Any] = {}

    def get(family: str | None) -> Any:
        if family not in made:
            tokens = PARSER_TOKENS[family] if family else []
            out = make_tokenizer(root / (family or "plain"), tokens)
            made[family] = get_tokenizer(str(out))
        return made[family]

    return get


def vllm_builds(feature: str, parser: str, tokenizer: Any) -> bool:
    """Whether vLLM's real parser class constructs with this tokenizer."""
    if feature == parser_support.TOOL_CALLING:
        from vllm.tool_parsers import ToolParserManager

        cls: Any = ToolParserManager.get_tool_parser(parser)
    else:
        from vllm.reasoning import ReasoningParserManager

        cls = ReasoningParserManager.get_reasoning_parser(parser)
    try:
        cls(tokenizer)
    except Exception:
        return False
    return True


def test_every_catalog_family_is_covered() -> None:
    assert set(FAMILIES) == set(NEEDS_TOKENS) == set(PARSER_TOKENS)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("with_tokens", [True, False], ids=["with-tokens", "plain"])
def test_check_agrees_with_vllms_parsers(
    family: str, with_tokens: bool, tokenizer_for: Callable[[str | None], Any]
) -> None:
    arch = FAMILIES[family]
    tok = tokenizer_for(family if with_tokens else None)
    support = parser_support.check(tok, arch.tool_call_parser, arch.reasoning_parser)
    configured = {parser_support.TOOL_CALLING: arch.tool_call_parser}
    if arch.reasoning_parser:
        configured[parser_support.REASONING] = arch.reasoning_parser
    for feature, parser in configured.items():
        assert parser is not None
        builds = vllm_builds(feature, parser, tok)
        assert (feature not in support.unavailable) == builds, (feature, parser)
    expected_off = set() if with_tokens else NEEDS_TOKENS[family]
    assert set(support.unavailable) == expected_off
    for feature in expected_off:
        reason = support.unavailable[feature]
        assert configured[feature] in reason and "served without it" in reason


def test_mixtral_without_tool_calls_token_serves_without_the_parser(
    tmp_path: Path,
) -> None:
    """Mixtral 8x7B Instruct v0.1's case, through the checkpoint path as `moectl up` and the
    replica load it: tool calling off, vLLM's arguments without the parser, reasoning kept."""
    from moe_serving.vllm_args import build_namespace

    make_tokenizer(tmp_path, [])  # no [TOOL_CALLS]
    engine = EngineArgs(model=str(tmp_path), served_model_name="m", tool_call_parser="mistral")
    support = parser_support.check_engine(engine)
    assert set(support.unavailable) == {parser_support.TOOL_CALLING}
    assert "[TOOL_CALLS]" in support.unavailable[parser_support.TOOL_CALLING] or (
        "tool call token" in support.unavailable[parser_support.TOOL_CALLING]
    )
    args = build_namespace(support.engine_args(engine))
    assert args.tool_call_parser is None and not args.enable_auto_tool_choice
    # With the token, nothing is turned off and vLLM gets the parser.
    make_tokenizer(tmp_path / "with", PARSER_TOKENS["mixtral"])
    full = engine.model_copy(update={"model": str(tmp_path / "with")})
    assert parser_support.check_engine(full).unavailable == {}
    assert build_namespace(full).tool_call_parser == "mistral"


def events(server: Any, body: dict[str, Any]) -> list[Any]:
    async def collect() -> list[Any]:
        return [e async for e in server.openai("chat", body)]

    return asyncio.run(collect())


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def test_requests_asking_for_tools_get_a_400_naming_the_reason() -> None:
    from moe_serving.engine import EngineServer
    from moe_serving.outcomes import grpc_code
    from moe_serving.protocol import Reason

    config = AppConfig(engine=EngineArgs(model="x", served_model_name="m"))
    server = EngineServer(config)
    reason = "tool calling is off: vLLM's 'mistral' parser cannot be used ..."
    server.unavailable = {parser_support.TOOL_CALLING: reason}
    messages = [{"role": "user", "content": "hi"}]
    for extra in ({}, {"tool_choice": "auto"}, {"tool_choice": "required"}, {"stream": True}):
        head, body = events(server, {"messages": messages, "tools": TOOLS, **extra})
        assert head.status == 400 and head.reason == Reason.TOOLS_UNAVAILABLE
        assert reason in body["error"]["message"]
    # gRPC: the ingress maps the engine's 400 to INVALID_ARGUMENT.
    assert grpc_code(400, Reason.TOOLS_UNAVAILABLE).name == "INVALID_ARGUMENT"
    # Requests not asking for tools are not refused by it (they reach admission).
    for body_ in (
        {"messages": messages},
        {"messages": messages, "tools": TOOLS, "tool_choice": "none"},
    ):
        assert not isinstance(server._parse("chat", body_), list)
    # The replica's live report carries the reason for the operator.
    assert server.live_report("r1")["unavailable"] == {parser_support.TOOL_CALLING: reason}
