"""The generated CRD: no drift, structural, and in agreement with the pydantic models."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
from unit_support import EXAMPLES, ROOT, load

from moe_operator import crdgen
from moe_operator.cli import main


def _walk(node: Any, path: str = "") -> Any:
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def test_generated_files_match_the_models() -> None:
    want = crdgen.crd_yaml()
    for rel in (crdgen.CHART_CRD, crdgen.MANIFEST_CRD):
        assert (ROOT / rel).read_text() == want, f"{rel} is stale: run `make crds`"


def test_generate_check_detects_drift(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    main(["generate", "--root", str(tmp_path)])
    main(["generate", "--check", "--root", str(tmp_path)])
    (tmp_path / crdgen.MANIFEST_CRD).write_text("stale\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--check", "--root", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "stale" in capsys.readouterr().err


def test_schema_is_structural() -> None:
    schema = crdgen.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        for banned in ("$ref", "anyOf", "oneOf", "allOf", "$defs", "title", "const"):
            assert banned not in node or path.endswith(".properties"), f"{banned} at {path}"
        assert node.get("additionalProperties") is not False, path
        if "properties" in node and not path.endswith(".properties"):
            assert node.get("type") == "object", path
        if "x-kubernetes-int-or-string" in node:
            assert "type" not in node, path


def test_crd_has_subresources_and_columns() -> None:
    version = crdgen.crd()["spec"]["versions"][0]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
    # `kubectl get moed -o wide`: the live load, rate and cost the operator reads from the app.
    assert columns["Queue"] == ".status.queueDepth"
    assert columns["$/1M-out"] == ".status.costPerMillionTokens"
    names = crdgen.crd()["spec"]["names"]
    assert names["shortNames"] == ["moed"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = [r["rule"] for _, n in _walk(spec) for r in n.get("x-kubernetes-validations", [])]
    assert "self.minReplicas <= self.maxReplicas" in rules
    # Defaults live in the schema so `kubectl get -o yaml` shows what is in force.
    assert spec["properties"]["serving"]["properties"]["httpPort"]["default"] == 8000
    assert spec["properties"]["parallelism"]["default"] == {}


def _to_draft(schema: Any) -> Any:
    """OpenAPI v3.0 -> JSON Schema for jsonschema: nullable, int-or-string, exclusive bounds."""
    if isinstance(schema, list):
        return [_to_draft(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _to_draft(v) for k, v in schema.items() if not k.startswith("x-kubernetes")}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if schema.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        out.pop("additionalProperties", None)
    if out.get("exclusiveMinimum") is True:
        out["exclusiveMinimum"] = out.pop("minimum")
    if out.get("exclusiveMaximum") is True:
        out["exclusiveMaximum"] = out.pop("maximum")
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False  # the API server prunes/rejects unknown fields
    out.pop("default", None)
    return out


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate_against_the_crd_schema(path: Any) -> None:
    schema = _to_draft(crdgen.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}
    jsonschema.validate(load(path), schema)


def test_crd_schema_rejects_what_the_models_reject(gemma: dict[str, Any]) -> None:
    schema = _to_draft(crdgen.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    bad = dict(gemma, spec={**gemma["spec"], "parallelism": {"bogus": 1}})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = dict(gemma, spec={**gemma["spec"], "resources": {"accelerator": "TPU"}})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
