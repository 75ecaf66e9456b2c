"""RBAC as used: the API calls a client made, and the rules the Helm chart grants."""

from __future__ import annotations

from typing import Any

from tests.support import helm_render as helm
from tests.support import kube_emulator as em

Grants = dict[tuple[str, str], set[str]]


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
