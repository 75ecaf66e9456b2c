"""RBAC as used: the API calls a client made, and the rules the Helm chart grants."""

from __future__ import annotations

import importlib.util
from types import ModuleType
from typing import Any

import kube_emulator as em
from operator_harness import ROOT

Grants = dict[tuple[str, str], set[str]]


def _helm_render() -> ModuleType:
    """tests/chart/helm_render.py (the chart tests' helm runner), loaded by path."""
    path = ROOT / "tests" / "chart" / "helm_render.py"
    spec = importlib.util.spec_from_file_location("chart_helm_render", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


helm = _helm_render()


def used(api: em.ApiServer, token: str) -> Grants:
    """(apiGroup, resource) -> verbs of every API call this client made."""
    out: Grants = {}
    for call in api.calls:
        if call.token == token and call.resource is not None:
            verbs = out.setdefault((call.group or "", call.resource), set())
            verbs.update({call.verb, "create"} if call.created else {call.verb})
    return out


def granted(objs: list[dict[str, Any]]) -> Grants:
    out: Grants = {}
    for role in helm.by_kind(objs, "ClusterRole") + helm.by_kind(objs, "Role"):
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def without(grants: Grants, other: Grants) -> Grants:
    out = {key: verbs - other.get(key, set()) for key, verbs in grants.items()}
    return {key: verbs for key, verbs in out.items() if verbs}
