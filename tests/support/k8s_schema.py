"""What kube-apiserver does with a custom resource and its CRD's structural schema, for tests.

Shared by the API emulator (kube_emulator.py) and the unit tests. It follows the
upstream behaviour, documented in "Extend the Kubernetes API with CustomResourceDefinitions"
(kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/):

* pruning: fields the schema does not declare are dropped (unless
  `x-kubernetes-preserve-unknown-fields`), and so are nulls of fields not marked `nullable`;
  with `fieldValidation=Strict` an unknown field is an error instead;
* defaulting: `default` values are filled in, nested ones included, before validation;
* validation: types (`x-kubernetes-int-or-string`, `anyOf`), enum, bounds, lengths, patterns
  (RE2, as Go's regexp), required, list sizes, and the CEL rules of `x-kubernetes-validations`
  (evaluated with cel-python; `oldSelf` rules only on updates where the old value exists).

Error strings mimic k8s.io/apimachinery/pkg/util/validation/field (`path: Type: detail`).
"""

from __future__ import annotations

import copy
import functools
import pathlib
from dataclasses import dataclass
from typing import Any

import celpy
import re2
import yaml

Obj = dict[str, Any]

#: Root fields the API server handles itself (ObjectMeta is never pruned by the CRD schema).
_ROOT_SKIP = ("apiVersion", "kind", "metadata")


@functools.cache
def load_crd_schema(path: pathlib.Path, version: str = "v1") -> Obj:
    """The openAPIV3Schema of one version of a CRD file (cached: KubeRay's are ~1 MB)."""
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    found = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    schema: Obj = found["schema"]["openAPIV3Schema"]
    return schema


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _children(node: Obj, value: Any, path: str) -> list[tuple[Obj, Any, str, str | int]]:
    """(schema, value, path, key) of each declared child of an object/array value."""
    out: list[tuple[Obj, Any, str, str | int]] = []
    if isinstance(value, dict):
        props = node.get("properties") or {}
        extra = node.get("additionalProperties")
        for key, child in value.items():
            if not path and key in _ROOT_SKIP:
                continue
            if key in props:
                out.append((props[key], child, _join(path, key), key))
            elif isinstance(extra, dict):
                out.append((extra, child, f"{path}[{key}]", key))
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        out.extend((node["items"], v, f"{path}[{i}]", i) for i, v in enumerate(value))
    return out


def _keeps_unknown(node: Obj) -> bool:
    return bool(
        node.get("x-kubernetes-preserve-unknown-fields")
        or node.get("x-kubernetes-embedded-resource")
        or isinstance(node.get("additionalProperties"), dict)
        or node.get("additionalProperties") is True
    )


def unknown_fields(schema: Obj, value: Any, path: str = "") -> list[str]:
    """Paths (`.spec.x`) of the fields pruning would drop."""
    found: list[str] = []
    if isinstance(value, dict) and not _keeps_unknown(schema):
        props = schema.get("properties") or {}
        for key in value:
            if not path and key in _ROOT_SKIP:
                continue
            if key not in props:
                found.append(f".{_join(path, key)}")
    for child, sub, sub_path, _ in _children(schema, value, path):
        found += unknown_fields(child, sub, sub_path)
    return found


def prune(schema: Obj, value: Any, path: str = "") -> Any:
    """The value without unknown fields and without nulls of non-nullable fields."""
    if isinstance(value, dict):
        out = {}
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        keep = _keeps_unknown(schema)
        for key, child in value.items():
            if not path and key in _ROOT_SKIP:
                out[key] = child
                continue
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is None:
                if keep:
                    out[key] = child
                continue
            if child is None and not sub.get("nullable"):
                continue
            out[key] = prune(sub, child, _join(path, key))
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune(schema["items"], v, path) for v in value]
    return value


def default(schema: Obj, value: Any, path: str = "") -> Any:
    """The value with the schema's defaults filled in (nested defaults of defaults too)."""
    if isinstance(value, dict):
        out = dict(value)
        for key, sub in (schema.get("properties") or {}).items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
        for sub, child, sub_path, key in _children(schema, out, path):
            out[key] = default(sub, child, sub_path)
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [default(schema["items"], v, path) for v in value]
    return value


# ------------------------------------------------------------------------------- validation


def _quote(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict | list):
        return f'"{"object" if isinstance(value, dict) else "array"}"'
    return str(value)


def _type_ok(kind: str, value: Any) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(
        value, {"string": str, "boolean": bool, "object": dict, "array": list}.get(kind, object)
    )


@functools.cache
def _program(rule: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def cel_value(value: Any) -> Any:
    """A JSON value as CEL sees it."""
    return celpy.json_to_cel(value)


def evaluate_rule(rule: str, value: Any, old: Any = None) -> bool | str:
    """True / False, or the evaluation error as text (the API server reports those too)."""
    activation = {"self": cel_value(value)}
    if old is not None:
        activation["oldSelf"] = cel_value(old)
    try:
        result = _program(rule).evaluate(activation)
    except celpy.CELEvalError as err:
        return str(err)
    if isinstance(result, celpy.CELEvalError):
        return str(result.args[0] if result.args else result)
    return bool(result)


def errors(schema: Obj, value: Any, path: str = "", old: Any = None) -> list[str]:
    """Validation errors of a (pruned, defaulted) value, in the API server's wording."""
    found: list[str] = []
    where = path or "<root>"
    if value is None:
        if not schema.get("nullable") and path:
            found.append(f"{where}: Invalid value: null: {where} in body must not be null")
        return found
    types = [schema["type"]] if "type" in schema else []
    if schema.get("x-kubernetes-int-or-string"):
        if not (_type_ok("integer", value) or isinstance(value, str)):
            found.append(
                f"{where}: Invalid value: {_quote(value)}: {where} in body must be of type "
                f"integer-or-string"
            )
            return found
    elif types and not _type_ok(types[0], value):
        found.append(
            f"{where}: Invalid value: {_quote(value)}: {where} in body must be of type {types[0]}: "
            f"{_quote(type(value).__name__)}"
        )
        return found
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(_quote(v) for v in schema["enum"])
        found.append(f"{where}: Unsupported value: {_quote(value)}: supported values: {allowed}")
    if _type_ok("number", value):
        low, high = schema.get("minimum"), schema.get("maximum")
        if low is not None and (value < low or (schema.get("exclusiveMinimum") and value == low)):
            op = "greater than" if schema.get("exclusiveMinimum") else "greater than or equal to"
            found.append(f"{where}: Invalid value: {value}: {where} in body should be {op} {low}")
        at_high = schema.get("exclusiveMaximum") and value == high
        if high is not None and (value > high or at_high):
            op = "less than" if schema.get("exclusiveMaximum") else "less than or equal to"
            found.append(f"{where}: Invalid value: {value}: {where} in body should be {op} {high}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            found.append(
                f"{where}: Invalid value: {_quote(value)}: {where} in body should be at least "
                f"{schema['minLength']} chars long"
            )
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            found.append(f"{where}: Too long: may not be more than {schema['maxLength']} bytes")
        if "pattern" in schema and re2.search(schema["pattern"], value) is None:
            found.append(
                f"{where}: Invalid value: {_quote(value)}: {where} in body should match "
                f"'{schema['pattern']}'"
            )
    if isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            found.append(f"{where}: Too many: {len(value)}: must have at most {schema['maxItems']}")
        if "minItems" in schema and len(value) < schema["minItems"]:
            found.append(f"{where}: Invalid value: {len(value)}: must have at least items")
    if isinstance(value, dict):
        for key in schema.get("required") or []:
            if key not in value:
                found.append(f"{_join(path, key)}: Required value")
    for branch in schema.get("anyOf") or []:
        if "type" in branch and _type_ok(branch["type"], value):
            break
    else:
        if schema.get("anyOf") and not schema.get("x-kubernetes-int-or-string"):
            found.append(f"{where}: Invalid value: {_quote(value)}: no anyOf branch matches")
    for sub, child, sub_path, key in _children(schema, value, path):
        old_child = None
        if isinstance(old, dict) and isinstance(key, str):
            old_child = old.get(key)
        found += errors(sub, child, sub_path, old_child)
    if found:
        return found  # rules see only values that passed the schema (as upstream)
    for rule in schema.get("x-kubernetes-validations") or []:
        uses_old = "oldSelf" in rule["rule"]
        if uses_old and old is None:
            continue
        verdict = evaluate_rule(rule["rule"], value, old if uses_old else None)
        if verdict is True:
            continue
        detail = rule.get("message") or f"failed rule: {rule['rule']}"
        if verdict is not False:
            detail = f"{verdict} evaluating rule: {rule['rule']}"
        found.append(f"{where}: Invalid value: {_quote(value)}: {detail}")
    return found


@dataclass(frozen=True)
class Schema:
    """One resource's openAPIV3Schema, with the API server's treatment of its objects."""

    root: Obj

    def unknown_fields(self, obj: Obj) -> list[str]:
        return unknown_fields(self.root, obj)

    def admit(self, obj: Obj, old: Obj | None = None) -> tuple[Obj, list[str]]:
        """(the stored form: pruned and defaulted, its validation errors)."""
        stored = default(self.root, prune(self.root, obj))
        return stored, errors(self.root, stored, "", old)
