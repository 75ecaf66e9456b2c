"""Every parser name the catalog picks is one the installed vLLM registers (no engine started)."""

from __future__ import annotations

import pytest

from moe_operator.catalog import ARCHITECTURES


@pytest.mark.parametrize("key", sorted(ARCHITECTURES))
def test_catalog_parsers_exist_in_vllm(key: str) -> None:
    reasoning = pytest.importorskip("vllm.reasoning")
    tools = pytest.importorskip("vllm.tool_parsers")
    arch = ARCHITECTURES[key]
    if arch.reasoning_parser:
        assert arch.reasoning_parser in reasoning.ReasoningParserManager.list_registered()
    if arch.tool_call_parser:
        assert arch.tool_call_parser in tools.ToolParserManager.list_registered()
