"""The rendered RayService against the CRD of every KubeRay release, and what a refusal means.

KubeRay's CRDs per release are read from ../shared/kuberay-crds/versions/<tag>/ (skipped when
absent) and applied as kube-apiserver applies a CRD's structural schema
(tests/support/k8s_schema.py): unknown fields are errors (server-side apply refuses them), then
defaults, types, enums, patterns and CEL rules.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from unit_support import CLUSTER_EXAMPLES, KUBERAY_CRDS, ROOT, load

from moe_operator.api import MoEDeploymentSpec
from moe_operator.kube import ApiError
from moe_operator.kuberay import MIN_KUBERAY, supported
from moe_operator.planner import plan
from moe_operator.render import Owner, render
from tests.support.k8s_schema import Schema, load_crd_schema

VERSIONS = KUBERAY_CRDS / "versions"
RELEASES = sorted(p.name for p in VERSIONS.iterdir()) if VERSIONS.is_dir() else []
EXAMPLES_DIR = ROOT / "manifests" / "examples"
UID = "8d3f0f5e-0000-4000-8000-000000000001"


def _layouts() -> dict[str, dict[str, Any]]:
    """The examples, and planner layouts they do not cover (multi-node EP, fixed replicas,
    incremental upgrades, tracing, API keys, custom scheduling)."""
    out = {p.name: load(p) for p in CLUSTER_EXAMPLES}
    gemma = load(EXAMPLES_DIR / "gemma4-26b-a4b-a100-80gb.yaml")
    variants: dict[str, dict[str, Any]] = {
        "fixed-replicas-h100": {
            "replicas": 3,
            "resources": {"accelerator": "H100-80GB", "gpusPerNode": 4},
        },
        "incremental-upgrade": {
            "upgradeStrategy": "NewClusterWithIncrementalUpgrade",
            "gatewayClassName": "istio",
        },
        "tracing-and-api-key": {
            "tracing": {"enabled": True, "endpoint": "http://otel.observability:4317"},
            "serving": {"apiKeySecretRef": {"name": "api-key"}, "httpPort": 8080},
        },
        "scheduling": {
            "resources": {
                "nodeSelector": {"pool": "gpu"},
                "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "cpu": 32,
                "memory": "256Gi",
            }
        },
        "scale-to-zero": {
            "autoscaling": {
                "enabled": True,
                "minReplicas": 0,
                "maxReplicas": 2,
                "scaleToZero": True,
            }
        },
    }
    for name, change in variants.items():
        body = copy.deepcopy(gemma)
        for key, value in change.items():
            if isinstance(value, dict):
                body["spec"].setdefault(key, {}).update(value)
            else:
                body["spec"][key] = value
        out[name] = body
    return out


LAYOUTS = _layouts()


def _ray_service(manifest: dict[str, Any]) -> dict[str, Any]:
    spec = MoEDeploymentSpec.model_validate(manifest["spec"])
    owner = Owner(manifest["metadata"]["name"], manifest["metadata"]["namespace"], UID, 2)
    (ray_service,) = [o for o in render(owner, spec, plan(spec)) if o["kind"] == "RayService"]
    return ray_service


def _schema(release: str) -> Schema:
    return Schema(load_crd_schema(VERSIONS / release / "ray.io_rayservices.yaml"))


def test_the_supported_range_is_tested() -> None:
    if not RELEASES:
        pytest.skip(f"KubeRay CRDs per release not found at {VERSIONS} (../shared/kuberay-crds)")
    assert [r for r in RELEASES if supported(r)], f"no KubeRay release >= {MIN_KUBERAY} to test"


@pytest.mark.parametrize("release", [r for r in RELEASES if supported(r)] or ["absent"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_rendered_rayservice_is_accepted_by_every_supported_kuberay(
    release: str, layout: str
) -> None:
    """Every supported KubeRay release's RayService CRD takes the rendered RayService whole: no
    field it does not declare (server-side apply refuses those: "field not declared in
    schema", k8s.io/apimachinery/pkg/util/managedfields/internal/structuredmerge.go) and
    nothing its schema rejects (ray-project/kuberay ray-operator/config/crd/bases/
    ray.io_rayservices.yaml at that release)."""
    if not RELEASES:
        pytest.skip(f"KubeRay CRDs per release not found at {VERSIONS} (../shared/kuberay-crds)")
    schema, ray_service = _schema(release), _ray_service(LAYOUTS[layout])
    assert schema.unknown_fields(ray_service) == []
    _, problems = schema.admit(ray_service)
    assert problems == []


@pytest.mark.parametrize("release", [r for r in RELEASES if not supported(r)] or ["absent"])
def test_older_kuberay_refuses_it_which_is_why_the_minimum(release: str) -> None:
    """Releases before v1.5.1 declare no `spec.rayClusterConfig.authOptions` (the Ray
    dashboard's token auth), which the operator always renders: they are outside the range."""
    if release == "absent":
        pytest.skip(f"no KubeRay release older than {MIN_KUBERAY} in {VERSIONS}")
    ray_service = _ray_service(LAYOUTS[CLUSTER_EXAMPLES[0].name])
    assert ".spec.rayClusterConfig.authOptions" in _schema(release).unknown_fields(ray_service)


def test_the_schema_check_catches_unknown_and_invalid_fields() -> None:
    """The check above can fail: a field KubeRay does not know, a value its enum refuses."""
    if not RELEASES:
        pytest.skip(f"KubeRay CRDs per release not found at {VERSIONS} (../shared/kuberay-crds)")
    schema = _schema(RELEASES[-1])
    ray_service = _ray_service(LAYOUTS[CLUSTER_EXAMPLES[0].name])
    cluster = ray_service["spec"]["rayClusterConfig"]
    cluster["workerGroupSpecs"][0]["gpusPerHost"] = 8
    cluster["authOptions"]["mode"] = "password"
    assert schema.unknown_fields(ray_service) == [
        ".spec.rayClusterConfig.workerGroupSpecs[0].gpusPerHost"
    ]
    (problem,) = schema.admit(ray_service)[1]
    assert problem.startswith(
        'spec.rayClusterConfig.authOptions.mode: Unsupported value: "password"'
    )


@pytest.mark.parametrize(
    ("status", "message", "rejected"),
    [
        (422, 'RayService.ray.io "x" is invalid: spec.x: Required value', True),
        (400, 'strict decoding error: unknown field "spec.x"', True),
        (
            500,
            "failed to create typed patch object (llm/x; ray.io/v1, Kind=RayService): "
            ".spec.rayClusterConfig.authOptions: field not declared in schema",
            True,
        ),
        (500, "etcdserver: request timed out", False),
        (503, "the server is currently unable to handle the request", False),
        (409, "the object has been modified", False),
        (429, "too many requests", False),
    ],
)
def test_api_errors_that_no_retry_can_fix(status: int, message: str, rejected: bool) -> None:
    """kube-apiserver answers a server-side apply naming an undeclared field with a bare 500
    (kubernetes/kubernetes#122480, #139253); that, 400 and 422 are refusals of the object, not
    transient errors to retry."""
    err = ApiError(status, "", message)
    assert err.rejected is rejected
    assert err.transient is (not rejected)
