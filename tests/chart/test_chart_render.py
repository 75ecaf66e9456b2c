"""`helm lint` and `helm template` of the chart; every object against the Kubernetes schemas."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.support.helm_render import (
    CHART,
    KUBE_VERSION,
    NAMESPACE,
    VALUE_SETS,
    by_kind,
    one,
    render,
    run_helm,
    template,
)

from .checks import CLUSTER_SCOPED, validate_object

# Namespaced kinds the chart places outside the release namespace: one per watched namespace.
PER_WATCHED_NAMESPACE = {"Role", "RoleBinding", "KopfPeering"}


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_strict_passes(name: str) -> None:
    proc = run_helm("lint", str(CHART), "--strict", values=VALUE_SETS[name])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_rendered_object_is_schema_valid(name: str) -> None:
    objs = render(VALUE_SETS[name])
    assert objs, "helm template rendered nothing"
    crds = by_kind(objs, "CustomResourceDefinition")
    for obj in objs:
        try:
            validate_object(obj, crds)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as err:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} ({name}): {err.message}")


def test_schema_validation_rejects_a_broken_deployment() -> None:
    """The validation above can fail: a misspelt field and a wrong type are caught."""
    deployment = one(render({}), "Deployment")
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBE_VERSION, strict=True)
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_namespaced_objects_land_in_the_right_namespace(name: str) -> None:
    values = VALUE_SETS[name]
    watched = values.get("watchNamespaces", [])
    for obj in render(values):
        meta = obj["metadata"]
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in meta, f"cluster-scoped {obj['kind']} has a namespace"
        elif obj["kind"] in PER_WATCHED_NAMESPACE:
            assert meta["namespace"] in watched, f"{obj['kind']} in {meta['namespace']}"
        else:
            assert meta["namespace"] == NAMESPACE, f"{obj['kind']}/{meta['name']}"


def test_per_namespace_objects_cover_every_watched_namespace() -> None:
    objs = render(VALUE_SETS["namespaces"])
    for kind in ("Role", "RoleBinding", "KopfPeering"):
        assert sorted(o["metadata"]["namespace"] for o in by_kind(objs, kind)) == ["a", "b"]


def test_values_schema_rejects_unknown_and_bad_values() -> None:
    misspelt = template({"watchNamespace": ["a"]})
    assert misspelt.returncode != 0
    assert "watchNamespace" in misspelt.stderr
    bad_level = template({"logLevel": "loud"})
    assert bad_level.returncode != 0
    assert "logLevel" in bad_level.stderr
    nested = template({"peering": {"enabeld": True}})
    assert nested.returncode != 0
    assert "enabeld" in nested.stderr


def test_namespace_patterns_with_peering_objects_fail_with_a_fix() -> None:
    proc = template({"watchNamespaces": ["team-*"]})
    assert proc.returncode != 0
    assert "peering.createObjects=false" in proc.stderr


def test_chart_metadata() -> None:
    chart: dict[str, Any] = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "moe-operator"
    assert chart["version"] == "0.1.0"
    assert chart["appVersion"] == "0.1.0"


def undocumented_keys(values_yaml: str) -> list[str]:
    """Keys with no comment right above them and not inside a commented block."""
    lines = values_yaml.splitlines()
    undocumented = []
    # (indent, commented) of the keys enclosing the current line.
    ancestors: list[tuple[int, bool]] = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "- ")) or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        while ancestors and ancestors[-1][0] >= indent:
            ancestors.pop()
        commented = i > 0 and lines[i - 1].strip().startswith("#")
        in_commented_block = any(block_commented for _, block_commented in ancestors)
        opens_section = stripped.endswith(":")
        if not (commented or in_commented_block or opens_section):
            undocumented.append(stripped)
        ancestors.append((indent, commented))
    return undocumented


def test_every_value_has_a_comment() -> None:
    assert undocumented_keys((CHART / "values.yaml").read_text()) == []
    # The check itself catches a bare key, also inside an uncommented section.
    sample = "# ok\na: 1\nb: 2\nsec:\n  # ok\n  c: 3\n  d: 4\n# block\nblk:\n  e: 5\n"
    assert undocumented_keys(sample) == ["b: 2", "d: 4"]
