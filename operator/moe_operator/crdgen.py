"""Generate the MoEDeployment CRD from the pydantic API models.

Pydantic emits JSON Schema (2020-12 flavour, with $refs); a CRD needs a *structural* OpenAPI v3
schema: every $ref inlined, `anyOf [X, null]` as plain X (not `nullable`: see `_any_of`), no
`additionalProperties: false`, int-or-string marked with `x-kubernetes-int-or-string`, free-form
maps with `x-kubernetes-preserve-unknown-fields`. Objects whose Python default is a factory get
`default: {}` so the API server fills their nested defaults.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from moe_operator import api

#: Generated files, relative to the project root.
CHART_CRD = Path("charts/moe-operator/crds/moedeployments.yaml")
MANIFEST_CRD = Path("manifests/crd.yaml")

_DROP = {"title", "additionalProperties", "$defs", "discriminator"}


def _model_classes(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Every model class reachable from root, by class name (pydantic's $defs keys)."""
    found: dict[str, type[BaseModel]] = {}
    stack: list[Any] = [root]
    while stack:
        cls = stack.pop()
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or cls.__name__ in found:
            continue
        found[cls.__name__] = cls
        for field in cls.model_fields.values():
            stack.extend(_types_in(field.annotation))
    return found


def _types_in(annotation: Any) -> list[Any]:
    args = getattr(annotation, "__args__", None)
    if args:
        out = []
        for a in args:
            out.extend(_types_in(a))
        return out
    return [annotation]


class _Converter:
    def __init__(self, schema: dict[str, Any], classes: dict[str, type[BaseModel]]) -> None:
        self.defs = schema.get("$defs", {})
        self.classes = classes

    def convert(self, node: dict[str, Any], model: type[BaseModel] | None = None) -> dict[str, Any]:
        node = copy.deepcopy(node)
        if "$ref" in node:
            name = node.pop("$ref").split("/")[-1]
            merged = {**self.defs[name], **node}  # a field's description overrides the model's
            return self.convert(merged, self.classes.get(name))
        any_of = node.pop("anyOf", None)
        if any_of is not None:
            return self._any_of(node, any_of)
        if "allOf" in node and len(node["allOf"]) == 1:
            inner = node.pop("allOf")[0]
            return self.convert({**inner, **node})
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in _DROP or (key == "default" and value is None):
                continue
            if key == "const":
                out["enum"] = [value]
                out.setdefault("type", "string")
            elif key == "exclusiveMinimum":
                out["minimum"] = value
                out["exclusiveMinimum"] = True
            elif key == "exclusiveMaximum":
                out["maximum"] = value
                out["exclusiveMaximum"] = True
            elif key == "properties":
                out["properties"] = self._properties(value, model)
            elif key == "items":
                out["items"] = self.convert(value)
            else:
                out[key] = value
        extra = node.get("additionalProperties")
        if out.get("type") == "object" and "properties" not in out:
            if isinstance(extra, dict) and extra:
                out["additionalProperties"] = self.convert(extra)
            elif not out.get("x-kubernetes-preserve-unknown-fields"):
                out["x-kubernetes-preserve-unknown-fields"] = True
        if out.get("x-kubernetes-int-or-string"):
            for key in ("type", "pattern", "minLength", "maxLength"):
                out.pop(key, None)
        if out.get("x-kubernetes-preserve-unknown-fields"):
            out.pop("additionalProperties", None)
            out["type"] = "object"
        return out

    def _any_of(self, node: dict[str, Any], options: list[dict[str, Any]]) -> dict[str, Any]:
        # `X | None` is X, not nullable: the API server then prunes an explicit null as if the
        # field were unset (and applies its default), which is what the models do with None
        # (ApiModel drops it); a stored null would reach CEL rules as a null value instead.
        non_null = [o for o in options if o.get("type") != "null"]
        if len(non_null) == 1:
            out = self.convert({**non_null[0], **node})
        else:
            types = {o.get("type") for o in non_null} | {
                "string" for o in non_null if "const" in o or "enum" in o
            }
            if types <= {"integer", "string", None}:
                # int | "auto": int-or-string with a CEL rule for the string case.
                out = {k: v for k, v in self.convert(node).items() if k != "type"}
                out["x-kubernetes-int-or-string"] = True
                words = sorted(
                    {
                        str(w)
                        for o in non_null
                        for w in o.get("enum", [o.get("const")])
                        if w is not None
                    }
                )
                if words:  # int | Literal[...]; a plain int | str needs no rule
                    allowed = ", ".join(f"'{w}'" for w in words)
                    out.setdefault("x-kubernetes-validations", []).append(
                        {
                            "rule": f"type(self) == int ? self >= 1 : self in [{allowed}]",
                            "message": f"must be a positive integer or one of {words}",
                        }
                    )
            else:
                raise TypeError(f"cannot express anyOf {options} in a structural schema")
        return out

    def _properties(self, props: dict[str, Any], model: type[BaseModel] | None) -> dict[str, Any]:
        out = {}
        factories: dict[str, Any] = {}
        if model is not None:
            for name, field in model.model_fields.items():
                if field.default_factory is not None:
                    factories[field.alias or name] = field.default_factory
        for key, value in props.items():
            converted = self.convert(value)
            if key in factories and "default" not in converted:
                made = factories[key]()
                converted["default"] = (
                    {} if isinstance(made, BaseModel) else made  # {}: nested defaults apply
                )
            out[key] = converted
        return out


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """Structural OpenAPI v3 schema of a pydantic model (camelCase field names)."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return _Converter(schema, _model_classes(model)).convert(schema, model)


def crd() -> dict[str, Any]:
    """The MoEDeployment CustomResourceDefinition."""
    spec_schema = structural_schema(api.MoEDeploymentSpec)
    status_schema = structural_schema(api.MoEDeploymentStatus)
    conditions = status_schema["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    conditions["items"].setdefault("required", ["type", "status"])
    root = {
        "type": "object",
        "description": "MoEDeployment serves a Mixture-of-Experts LLM with expert parallelism.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
    }
    ready = '.status.conditions[?(@.type=="Ready")].status'
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.GROUP}",
            "labels": {"app.kubernetes.io/name": "moe-operator"},
        },
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": ["all", "moe"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": root},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": [
                        {"name": "Model", "type": "string", "jsonPath": ".spec.model.name"},
                        {"name": "Layout", "type": "string", "jsonPath": ".status.plan.summary"},
                        {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
                        {"name": "Ready", "type": "string", "jsonPath": ready},
                        {
                            "name": "Queue",
                            "type": "number",
                            "jsonPath": ".status.queueDepth",
                            "priority": 1,
                        },
                        {
                            "name": "Tokens/s",
                            "type": "number",
                            "jsonPath": ".status.outputTokensPerSecond",
                            "priority": 1,
                        },
                        {
                            "name": "$/1M-out",
                            "type": "number",
                            "jsonPath": ".status.costPerMillionTokens",
                            "priority": 1,
                        },
                        {
                            "name": "Imbalance",
                            "type": "number",
                            "jsonPath": ".status.expertImbalance",
                            "priority": 1,
                        },
                        {
                            "name": "Accelerator",
                            "type": "string",
                            "jsonPath": ".spec.resources.accelerator",
                            "priority": 1,
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                }
            ],
        },
    }


HEADER = "# Generated by `make crds` (moectl generate) from moe_operator/api.py. Do not edit.\n"


def crd_yaml() -> str:
    """The CRD as a YAML document with the generated-file header."""
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=100)


def write(root: Path) -> list[Path]:
    """Write the generated CRD files under the project root; returns the paths written."""
    text = crd_yaml()
    written = []
    for rel in (CHART_CRD, MANIFEST_CRD):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written
