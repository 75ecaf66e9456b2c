"""Which of the configured vLLM parsers the checkpoint's tokenizer supports.

vLLM refuses to start its OpenAI serving layer when a tool-call or reasoning parser cannot be
built with the model's tokenizer (vllm/parser/parser_manager.py,
`ParserManager.validate_parser_tokenizer`: e.g. the `mistral` tool parser on Mixtral 8x7B
Instruct v0.1, whose tokenizer has no `[TOOL_CALLS]` token). Both parsers are optional features:
a replica must serve without them rather than fail to start and be retried by Ray Serve forever.

`check` runs vLLM's own check, one parser at a time, before the engine starts (in the replica,
and in `moectl up` for the note it prints); `EngineServer` then starts vLLM without what the
tokenizer cannot support, logs a warning, refuses requests that ask for it with a 400 naming
the reason, and reports it in the live state (`/v1/moe/state`), from which the operator sets a
condition on the MoEDeployment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_serving.config import EngineArgs

#: Feature names as they appear in the live state's `unavailable` map.
TOOL_CALLING = "tool_calling"
REASONING = "reasoning"


@dataclass(frozen=True)
class ParserSupport:
    """What the tokenizer supports of the configured parsers."""

    tool_call_parser: str | None
    reasoning_parser: str | None
    #: feature (TOOL_CALLING / REASONING) -> why it is off, for users
    unavailable: dict[str, str] = field(default_factory=dict)

    def engine_args(self, engine: EngineArgs) -> EngineArgs:
        """`engine` without the parsers the tokenizer cannot support."""
        update: dict[str, Any] = {}
        if TOOL_CALLING in self.unavailable:
            update["tool_call_parser"] = None
        if REASONING in self.unavailable:
            update["reasoning_parser"] = None
        return engine.model_copy(update=update) if update else engine


def _reason(feature: str, parser: str, exc: BaseException) -> str:
    what = "tool calling" if feature == TOOL_CALLING else "reasoning parsing"
    flag = "toolCallParser" if feature == TOOL_CALLING else "reasoningParser"
    return (
        f"{what} is off: vLLM's {parser!r} parser cannot be used with this checkpoint's "
        f"tokenizer ({exc}). The model is served without it; to get it, serve a checkpoint "
        f"whose tokenizer has the parser's special tokens, or set spec.model.{flag} to a "
        "parser that fits this tokenizer"
    )


def check(
    tokenizer: Any,
    tool_call_parser: str | None,
    reasoning_parser: str | None,
    model_name: str | None = None,
) -> ParserSupport:
    """vLLM's startup check of each configured parser against `tokenizer` (no engine)."""
    from vllm.parser.parser_manager import ParserManager

    unavailable: dict[str, str] = {}
    if tool_call_parser:
        try:
            ParserManager.get_parser(
                tool_parser_name=tool_call_parser,
                enable_auto_tools=True,
                model_name=model_name,
                tokenizer=tokenizer,
            )
        except Exception as exc:  # vLLM raises TypeError; a parser's own may be anything
            unavailable[TOOL_CALLING] = _reason(TOOL_CALLING, tool_call_parser, exc)
    if reasoning_parser:
        try:
            ParserManager.get_parser(
                reasoning_parser_name=reasoning_parser,
                model_name=model_name,
                tokenizer=tokenizer,
            )
        except Exception as exc:
            unavailable[REASONING] = _reason(REASONING, reasoning_parser, exc)
    return ParserSupport(tool_call_parser, reasoning_parser, unavailable)


def load_tokenizer(model: str | Path, revision: str | None = None, **kwargs: Any) -> Any:
    """The tokenizer vLLM would load for `model` (a checkpoint folder or hub id)."""
    from vllm.tokenizers import get_tokenizer

    return get_tokenizer(str(model), revision=revision, **kwargs)


def check_engine(engine: EngineArgs, tokenizer: Any | None = None) -> ParserSupport:
    """`check` for an engine's configured parsers, loading its tokenizer unless given."""
    if not engine.tool_call_parser and not engine.reasoning_parser:
        return ParserSupport(None, None)
    if tokenizer is None:
        kwargs = {
            k: engine.extra[k] for k in ("tokenizer_mode", "trust_remote_code") if k in engine.extra
        }
        tokenizer = load_tokenizer(
            engine.extra.get("tokenizer") or engine.model,
            revision=engine.extra.get("tokenizer_revision") or engine.revision,
            **kwargs,
        )
    return check(tokenizer, engine.tool_call_parser, engine.reasoning_parser, engine.model)


def asks_for_tools(body: Any) -> bool:
    """A chat request that wants tool calls parsed: tools given and tool_choice not "none"."""
    tools = getattr(body, "tools", None)
    return bool(tools) and getattr(body, "tool_choice", None) != "none"
