"""The chart's RBAC: exactly the operator's API calls, no wildcards, no Secrets.

The grants below are what tests/operator/test_chart_command.py records the chart's operator
calling over a full lifecycle (that test compares the recorded calls with the rendered rules).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moe_operator.api import MoEDeploymentSpec
from moe_operator.planner import plan
from moe_operator.render import Owner
from moe_operator.render import render as render_children
from tests.support.helm_render import (
    NAMESPACE,
    ROOT,
    VALUE_SETS,
    Obj,
    by_kind,
    crd_files,
    one,
    render,
)

from .checks import all_rules, rule_problems

Grants = dict[tuple[str, str], set[str]]

CRUD = {"get", "list", "watch", "create", "patch", "delete"}
# What the operator itself calls in the namespaces it serves.
NAMESPACED: Grants = {
    ("serving.moeoperator.io", "moedeployments"): {"get", "list", "watch", "patch"},
    ("serving.moeoperator.io", "moedeployments/status"): {"patch"},
    # Checked by the OwnerReferencesPermissionEnforcement admission plugin (see below).
    ("serving.moeoperator.io", "moedeployments/finalizers"): {"update"},
    ("ray.io", "rayservices"): CRUD,
    ("", "services"): CRUD,
    ("policy", "poddisruptionbudgets"): CRUD,
    ("networking.k8s.io", "networkpolicies"): CRUD,
    ("", "events"): {"create"},
}
CRDS: Grants = {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"}}
NAMESPACES: Grants = {("", "namespaces"): {"list", "watch"}}
# kopf lists, watches and patches its peering; the live-state reader gets it (live_poller.py).
PEERING_VERBS = {"get", "list", "watch", "patch"}
CLUSTER_PEERING: Grants = {("kopf.dev", "clusterkopfpeerings"): PEERING_VERBS}
NS_PEERING: Grants = {("kopf.dev", "kopfpeerings"): PEERING_VERBS}
WEBHOOK: Grants = {
    ("admissionregistration.k8s.io", "validatingwebhookconfigurations"): {"create", "patch"}
}


def grants(rules: list[Obj]) -> Grants:
    """(apiGroup, resource) -> verbs, merged over all rules."""
    out: Grants = {}
    for rule in rules:
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def merged(*parts: Grants) -> Grants:
    out: Grants = {}
    for part in parts:
        for key, verbs in part.items():
            out.setdefault(key, set()).update(verbs)
    return out


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_no_wildcards_and_no_secrets(name: str) -> None:
    rules = all_rules(render(VALUE_SETS[name]))
    assert rules
    assert rule_problems(rules) == []


def test_rule_checker_catches_wildcards_and_secrets() -> None:
    bad = [
        {"apiGroups": ["*"], "resources": ["pods"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["*"]},
    ]
    assert len(rule_problems(bad)) == 3


def test_all_namespaces_one_cluster_role_with_exactly_the_operators_calls() -> None:
    objs = render({})
    assert not by_kind(objs, "Role")
    assert grants(one(objs, "ClusterRole")["rules"]) == merged(CRDS, CLUSTER_PEERING, NAMESPACED)


def test_watched_namespaces_get_roles_and_a_cluster_role_for_crds_only() -> None:
    objs = render(VALUE_SETS["namespaces"])
    assert grants(one(objs, "ClusterRole")["rules"]) == CRDS
    roles = by_kind(objs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["a", "b"]
    for role in roles:
        assert grants(role["rules"]) == merged(NAMESPACED, NS_PEERING)


def test_peering_off_grants_no_peering() -> None:
    objs = render(VALUE_SETS["no-peering"])
    assert grants(one(objs, "ClusterRole")["rules"]) == merged(CRDS, NAMESPACED)


def test_webhook_adds_only_webhook_configurations() -> None:
    objs = render(VALUE_SETS["webhook"])
    assert grants(one(objs, "ClusterRole")["rules"]) == merged(
        CRDS, CLUSTER_PEERING, NAMESPACED, WEBHOOK
    )
    standalone = render(VALUE_SETS["namespaces-webhook-standalone"])
    assert grants(one(standalone, "ClusterRole")["rules"]) == merged(CRDS, WEBHOOK)
    for role in by_kind(standalone, "Role"):
        assert grants(role["rules"]) == NAMESPACED


def test_namespace_patterns_need_cluster_wide_rules_and_namespace_watch() -> None:
    objs = render(VALUE_SETS["patterns"])
    assert not by_kind(objs, "Role")
    assert grants(one(objs, "ClusterRole")["rules"]) == merged(
        CRDS, NAMESPACES, NAMESPACED, NS_PEERING
    )


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_bindings_bind_the_operators_service_account(name: str) -> None:
    objs = render(VALUE_SETS[name])
    account = one(objs, "ServiceAccount")["metadata"]["name"]
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objs}
    bindings = by_kind(objs, "ClusterRoleBinding") + by_kind(objs, "RoleBinding")
    assert len(bindings) == 1 + len(by_kind(objs, "Role"))
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
        ]
        ref = binding["roleRef"]
        scope = binding["metadata"].get("namespace") if ref["kind"] == "Role" else None
        assert (ref["kind"], scope, ref["name"]) in roles


def test_rbac_can_be_left_to_the_user() -> None:
    objs = render({"rbac": {"create": False}})
    kinds = {o["kind"] for o in objs}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


def _children() -> list[Obj]:
    """Every child the operator renders for the cluster examples (NetworkPolicy included)."""
    out: list[Obj] = []
    for path in sorted((ROOT / "manifests" / "examples").glob("*.yaml")):
        if "tiny" in path.name:
            continue
        manifest = yaml.safe_load(Path(path).read_text())
        manifest["spec"]["networkPolicy"] = {"enabled": True}
        spec = MoEDeploymentSpec.model_validate(manifest["spec"])
        out += render_children(Owner("x", "ns", "uid"), spec, plan(spec))
    return out


def _plurals() -> dict[tuple[str, str], str]:
    """(group, kind) -> plural of the chart's CRDs."""
    out = {}
    for path in crd_files():
        crd = yaml.safe_load(path.read_text())
        out[(crd["spec"]["group"], crd["spec"]["names"]["kind"])] = crd["spec"]["names"]["plural"]
    return out


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_blocking_owner_references_are_backed_by_finalizers_rbac(name: str) -> None:
    """With the OwnerReferencesPermissionEnforcement admission plugin (kubernetes
    plugin/pkg/admission/gc/gc_admission.go: ownerRefToDeleteAttributeRecords asks for verb
    `update` on the owner's `finalizers` subresource for every ownerReference that newly has
    blockOwnerDeletion: true, and `delete` on the object whose ownerReferences change), a
    child write without those grants is a 403. Every child the operator renders must be
    writable under every value set's namespaced rules."""
    objs = render(VALUE_SETS[name])
    roles = by_kind(objs, "Role") or by_kind(objs, "ClusterRole")
    plurals = _plurals()
    children = _children()
    assert any(
        ref.get("blockOwnerDeletion") for c in children for ref in c["metadata"]["ownerReferences"]
    )
    for role in roles:
        have = grants(role["rules"])
        for child in children:
            group = child["apiVersion"].rpartition("/")[0]
            child_plural = {
                "RayService": "rayservices",
                "Service": "services",
                "PodDisruptionBudget": "poddisruptionbudgets",
                "NetworkPolicy": "networkpolicies",
            }[child["kind"]]
            assert "delete" in have.get((group, child_plural), set()), (name, child["kind"])
            for ref in child["metadata"]["ownerReferences"]:
                if not ref.get("blockOwnerDeletion"):
                    continue
                owner_group = ref["apiVersion"].rpartition("/")[0]
                plural = plurals[(owner_group, ref["kind"])]
                assert "update" in have.get((owner_group, f"{plural}/finalizers"), set()), (
                    name,
                    child["kind"],
                    role["kind"],
                )
