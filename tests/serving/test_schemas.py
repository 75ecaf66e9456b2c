"""Request schemas are checked against the JSON Schema metaschema (no engine)."""

from __future__ import annotations

from moe_serving.schemas import schema_problem


def _fmt(schema: object) -> dict[str, object]:
    return {
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    }


def test_valid_schemas_pass() -> None:
    ok = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 1}}}
    assert schema_problem(_fmt(ok)) is None
    assert (
        schema_problem(
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": ok}}]}
        )
        is None
    )
    assert schema_problem({"response_format": {"type": "json_object"}}) is None
    assert schema_problem({}) is None


def test_metaschema_violations_are_named() -> None:
    problem = schema_problem(_fmt({"minimum": "low"}))
    assert problem is not None
    assert problem.startswith("response_format.json_schema.schema is not a valid JSON Schema")
    assert "minimum" in problem
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}
    problem = schema_problem({"tools": [{"type": "function", "function": {"name": "g"}}, tool]})
    assert problem is not None and problem.startswith("tools[1].function.parameters")
    assert schema_problem(_fmt("not a schema")) == (
        "response_format.json_schema.schema must be a JSON Schema object"
    )
