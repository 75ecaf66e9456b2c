"""The kinds of object a MoEDeployment owns: one table (pure data, no I/O).

Everything that names the child kinds is made from `CHILDREN`: kube.KINDS (where the operator
writes them), the kopf indexes that cache them, the server-side label selectors of their
watches and the event handlers that queue the owner's reconcile (handlers.py). A new kind of
child is one row here (and its RBAC in the chart).
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_operator.api import LABEL_MANAGED_BY, MANAGED_BY


@dataclass(frozen=True)
class ChildKind:
    """One kind of child: its API coordinates and the ids kopf knows it by."""

    kind: str
    group: str  # "" for the core API group
    version: str
    plural: str
    short: str  # prefix of the kopf index and event handler ids

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> tuple[str, str]:
        """(apiVersion, kind), as in a rendered object."""
        return (self.api_version, self.kind)

    @property
    def selector(self) -> tuple[str, str] | tuple[str, str, str]:
        """The resource as kopf's decorators and settings take it (core: version, plural)."""
        if not self.group:
            return (self.version, self.plural)
        return (self.group, self.version, self.plural)

    @property
    def index_id(self) -> str:
        return f"{self.short}_children"

    @property
    def event_id(self) -> str:
        return f"{self.short}_event"


RAY_SERVICE = ChildKind("RayService", "ray.io", "v1", "rayservices", "rayservice")

#: Every kind the operator renders, applies, caches and prunes.
CHILDREN: tuple[ChildKind, ...] = (
    RAY_SERVICE,
    ChildKind("Service", "", "v1", "services", "service"),
    ChildKind("PodDisruptionBudget", "policy", "v1", "poddisruptionbudgets", "pdb"),
    ChildKind("NetworkPolicy", "networking.k8s.io", "v1", "networkpolicies", "networkpolicy"),
)

#: Label selector of the children's watches: only our own objects, never every Service.
MANAGED_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
