"""Checks shared by the chart and install-bundle tests: schema validation and RBAC hygiene."""

from __future__ import annotations

import jsonschema
import kubernetes_validate

from tests.support.helm_render import KUBE_VERSION, Obj

CLUSTER_SCOPED = frozenset(
    {
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "ClusterKopfPeering",
        "Namespace",
    }
)


def validate_object(obj: Obj, crds: list[Obj]) -> None:
    """Validate against the official Kubernetes schema (strict: unknown fields fail), or a
    custom resource against its CRD's openAPIV3Schema. Raises a ValidationError."""
    group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
    crd = next(
        (
            c
            for c in crds
            if c["spec"]["group"] == group and c["spec"]["names"]["kind"] == obj["kind"]
        ),
        None,
    )
    if crd is not None:
        version = obj["apiVersion"].split("/")[1]
        served = next(v for v in crd["spec"]["versions"] if v["name"] == version)
        jsonschema.validate(obj, served["schema"]["openAPIV3Schema"])
        return
    kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def all_rules(objs: list[Obj]) -> list[Obj]:
    """Every RBAC rule of every ClusterRole and Role."""
    return [r for o in objs if o["kind"] in {"ClusterRole", "Role"} for r in o["rules"]]


def rule_problems(rules: list[Obj]) -> list[str]:
    """Wildcards, Secrets access or non-resource URLs in RBAC rules (empty = clean)."""
    problems = []
    for rule in rules:
        for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
            if any("*" in item for item in rule.get(field, [])):
                problems.append(f"wildcard in {field}: {rule}")
        if any(r == "secrets" or r.startswith("secrets/") for r in rule.get("resources", [])):
            problems.append(f"secrets access: {rule}")
        if rule.get("nonResourceURLs"):
            problems.append(f"nonResourceURLs: {rule}")
    return problems
