"""Which KubeRay releases the rendered RayService needs (pure data, no I/O).

The RayService sets `spec.rayClusterConfig.authOptions` (token auth for the Ray dashboard, which
KubeRay's operator uses to deploy the Serve config): its CRD first declares that field in KubeRay
v1.5.1. Older CRDs lack it, and the API server refuses the whole RayService (server-side apply:
"field not declared in schema"). tests/unit/test_kuberay_versions.py validates the rendered
RayServices against the CRD of every KubeRay release in ../shared/kuberay-crds/versions/ from
this one on, and shows the older ones refuse them.
"""

from __future__ import annotations

#: The oldest KubeRay release whose RayService CRD accepts what the operator renders.
MIN_KUBERAY_VERSION = (1, 5, 1)
MIN_KUBERAY = "v" + ".".join(map(str, MIN_KUBERAY_VERSION))


def parse_version(tag: str) -> tuple[int, ...]:
    """(1, 5, 2) from "v1.5.2" (release tags of ray-project/kuberay)."""
    return tuple(int(part) for part in tag.lstrip("v").split("-")[0].split("."))


def supported(tag: str) -> bool:
    """True for KubeRay releases the rendered RayService works with."""
    return parse_version(tag) >= MIN_KUBERAY_VERSION


def rejection_hint(kind: str) -> str:
    """What to do after the API server refused a rendered child of this kind."""
    if kind == "RayService":
        return (
            f"The RayService needs KubeRay {MIN_KUBERAY} or newer (its CRD must declare "
            "spec.rayClusterConfig.authOptions): upgrade KubeRay's operator and CRDs, then edit "
            "the MoEDeployment or restart the moe-operator to retry."
        )
    return "Fix what the API server names, then edit the MoEDeployment or restart the moe-operator."
