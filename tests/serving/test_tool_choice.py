"""Which tool-call parsers the replica gives vLLM a JSON-forcing variant of (no engine: vLLM's
parser registry only). The served behaviour is in test_agent_native_parsers.py."""

from __future__ import annotations

import pytest

from moe_operator.catalog import ARCHITECTURES
from moe_serving import tool_choice


@pytest.mark.parametrize(
    ("parser", "forced"),
    [
        ("gemma4", True),  # vLLM 0.32 leaves required/named unconstrained
        ("mistral", False),  # constrains them in its own adjust_request
        ("hermes", False),  # xgrammar structural tag
        ("deepseek_v3", False),  # xgrammar structural tag
    ],
)
def test_only_parsers_vllm_leaves_unconstrained_get_a_variant(parser: str, forced: bool) -> None:
    from vllm.tool_parsers import ToolParserManager

    name = tool_choice.constrained_parser(parser)
    assert name == (parser + tool_choice.SUFFIX if forced else parser)
    variant = ToolParserManager.get_tool_parser(name)  # registered, so vLLM can build it
    if forced:
        base = ToolParserManager.get_tool_parser(parser)
        assert issubclass(variant, base) and variant.supports_required_and_named


def test_every_catalog_parser_is_known_to_vllm() -> None:
    from vllm.tool_parsers import ToolParserManager

    for arch in ARCHITECTURES.values():
        if arch.tool_call_parser:
            ToolParserManager.get_tool_parser(tool_choice.constrained_parser(arch.tool_call_parser))


def test_no_parser_means_no_variant() -> None:
    assert tool_choice.constrained_parser(None) is None
