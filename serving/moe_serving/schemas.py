"""Reject malformed JSON Schemas in requests before they reach the engine.

vLLM's grammar compiler accepts some schemas that break JSON Schema's own rules (for example
`{"minimum": "low"}`) and would answer 200 with unconstrained output; we answer 400 /
INVALID_ARGUMENT instead, naming the offending schema.
"""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError


def _check(schema: Any, where: str) -> str | None:
    if not isinstance(schema, dict | bool):
        return f"{where} must be a JSON Schema object"
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as err:
        path = "/".join(str(p) for p in err.absolute_path) or "(root)"
        return f"{where} is not a valid JSON Schema: at {path}: {err.message}"
    return None


def schema_problem(body: dict[str, Any]) -> str | None:
    """The first problem with the request's response_format or tool schemas, or None."""
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        if isinstance(spec, dict) and "schema" in spec:
            problem = _check(spec["schema"], "response_format.json_schema.schema")
            if problem:
                return problem
    for i, tool in enumerate(body.get("tools") or []):
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and "parameters" in function:
            problem = _check(function["parameters"], f"tools[{i}].function.parameters")
            if problem:
                return problem
    return None
