"""Every pod the operator renders meets the "restricted" Pod Security Standard.

Uses the same checker as the chart tests (tests/support/pod_security.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from unit_support import CLUSTER_EXAMPLES, ROOT, load

from moe_operator.api import MoEDeploymentSpec
from moe_operator.planner import plan
from moe_operator.render import Owner, render
from tests.support.pod_security import restricted_violations


def _pods(path: Path) -> list[tuple[str, dict[str, Any]]]:
    manifest = load(path)
    spec = MoEDeploymentSpec.model_validate(manifest["spec"])
    (ray_service, *_) = render(Owner("x", "ns", "uid"), spec, plan(spec))
    cluster = ray_service["spec"]["rayClusterConfig"]
    pods = [("head", cluster["headGroupSpec"]["template"])]
    pods += [(g["groupName"], g["template"]) for g in cluster["workerGroupSpecs"]]
    return pods


@pytest.mark.parametrize("path", CLUSTER_EXAMPLES, ids=lambda p: p.name)
def test_rendered_pods_are_restricted(path: Path) -> None:
    for name, template in _pods(path):
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": template["spec"],
        }
        assert restricted_violations(pod) == [], name


def test_autoscaler_sidecar_is_restricted() -> None:
    manifest = load(ROOT / "manifests/examples/gemma4-26b-a4b-a100-80gb.yaml")
    spec = MoEDeploymentSpec.model_validate(manifest["spec"])
    ray_service = render(Owner("x", "ns", "uid"), spec, plan(spec))[0]
    sc = ray_service["spec"]["rayClusterConfig"]["autoscalerOptions"]["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["runAsNonRoot"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}


def test_checker_catches_a_privileged_engine() -> None:
    _, template = _pods(CLUSTER_EXAMPLES[0])[1]
    template["spec"]["containers"][0]["securityContext"]["privileged"] = True
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "w"}, "spec": template["spec"]}
    assert restricted_violations(pod)
