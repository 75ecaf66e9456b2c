"""Readable messages for invalid MoEDeployment input (CLI, webhook, status conditions)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


def field_path(loc: tuple[Any, ...], prefix: str = "spec") -> str:
    """A pydantic error location as a manifest path: spec.parallelism.eplb.windowSize."""
    parts = [prefix] if prefix else []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        elif isinstance(item, str) and item not in ("function-after", "function-before"):
            # Union members show up as their type name ("int", "literal['auto']"): skip them.
            if item in ("int", "str", "float", "bool") or item.startswith(("literal[", "lax-")):
                continue
            parts.append(item)
    return ".".join(parts)


def describe(err: ValidationError, prefix: str = "spec") -> list[str]:
    """One line per problem: '<field path>: <what is wrong> (got <value>)'."""
    lines: list[str] = []
    seen: set[str] = set()
    for e in err.errors(include_url=False):
        path = field_path(tuple(e["loc"]), prefix)
        msg = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; fields are camelCase)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        got = e.get("input")
        line = f"{path}: {msg}"
        if e["type"] not in ("missing", "extra_forbidden") and not isinstance(got, dict | list):
            line += f" (got {got!r})"
        if line not in seen:
            seen.add(line)
            lines.append(line)
    return lines
