"""The renderer: schema-valid Kubernetes objects, KubeRay-valid RayServices, pinned by goldens.

Set UPDATE_GOLDEN=1 to rewrite tests/unit/golden/ after an intended change (then review the diff).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from unit_support import CLUSTER_EXAMPLES, KUBERAY_CRDS, ROOT, load

from moe_operator.api import LABEL_DEPLOYMENT, MoEDeploymentSpec
from moe_operator.planner import plan
from moe_operator.render import Owner, RenderError, endpoints, render
from moe_operator.yamlio import dump_all
from moe_serving.config import APP_IMPORT_PATH, AppConfig

GOLDEN = Path(__file__).parent / "golden"
K8S_VERSION = "1.33.0"
UID = "8d3f0f5e-0000-4000-8000-000000000001"


def _render(path: Path) -> list[dict[str, Any]]:
    manifest = load(path)
    spec = MoEDeploymentSpec.model_validate(manifest["spec"])
    owner = Owner(manifest["metadata"]["name"], manifest["metadata"]["namespace"], UID, 3)
    return render(owner, spec, plan(spec))


@pytest.fixture(scope="module")
def kuberay_schemas() -> dict[str, Any]:
    if not KUBERAY_CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {KUBERAY_CRDS} (../shared/kuberay-crds)")
    schemas = {}
    for kind, file in (
        ("RayService", "ray.io_rayservices.yaml"),
        ("RayCluster", "ray.io_rayclusters.yaml"),
    ):
        crd = yaml.safe_load((KUBERAY_CRDS / file).read_text())
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schemas[kind] = version["schema"]["openAPIV3Schema"]
    return schemas


def _strict(schema: Any) -> Any:
    """KubeRay's CRD schema as JSON Schema that also rejects unknown fields (API server pruning
    would silently drop them: a field we set that KubeRay does not know is a bug)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.mark.parametrize("path", CLUSTER_EXAMPLES, ids=lambda p: p.name)
def test_objects_validate_against_kubernetes_schemas(path: Path) -> None:
    for obj in _render(path):
        if obj["kind"] == "RayService":
            continue  # not a core type: checked against KubeRay's CRD below
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", CLUSTER_EXAMPLES, ids=lambda p: p.name)
def test_rayservice_validates_against_kuberay_crd(path: Path, kuberay_schemas: Any) -> None:
    ray_service = _render(path)[0]
    assert ray_service["kind"] == "RayService"
    jsonschema.validate(ray_service, _strict(kuberay_schemas["RayService"]))
    # Pod templates inside must also be valid core/v1 PodTemplateSpecs.
    cluster = ray_service["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "x"},
            "spec": group["template"]["spec"],
        }
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_strict_kuberay_check_catches_unknown_fields(kuberay_schemas: Any) -> None:
    ray_service = _render(CLUSTER_EXAMPLES[0])[0]
    ray_service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["gpusPerHost"] = 8
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(ray_service, _strict(kuberay_schemas["RayService"]))


@pytest.mark.parametrize("path", CLUSTER_EXAMPLES, ids=lambda p: p.name)
def test_golden(path: Path) -> None:
    text = dump_all(_render(path))
    golden = GOLDEN / path.name
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert golden.is_file(), f"no golden for {path.name}: run with UPDATE_GOLDEN=1"
    assert text == golden.read_text(), f"{golden} differs (UPDATE_GOLDEN=1 if intended)"


def test_serve_config_carries_the_plan_and_parses_as_app_config() -> None:
    objects = _render(ROOT / "manifests/examples/deepseek-v3-4x8xa100-80gb.yaml")
    serve = yaml.safe_load(objects[0]["spec"]["serveConfigV2"])
    app = serve["applications"][0]
    assert app["import_path"] == APP_IMPORT_PATH
    assert serve["grpc_options"]["port"] == 9000 and serve["http_options"]["port"] == 8000
    cfg = AppConfig.model_validate(app["args"])
    engine = cfg.engine
    assert (engine.tensor_parallel_size, engine.data_parallel_size) == (1, 32)
    assert engine.enable_expert_parallel and engine.all2all_backend == "deepep_high_throughput"
    assert engine.eplb.enabled and engine.eplb.num_redundant_experts == 32
    assert engine.model == "/models/model-store/deepseek-ai/DeepSeek-V3"
    assert engine.distributed_executor_backend == "ray"
    worker = objects[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert worker["numOfHosts"] == 4
    assert (
        worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    )
    volumes = {v["name"]: v for v in worker["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "model-store"


def test_autoscaling_turns_on_kuberay_autoscaler() -> None:
    objects = _render(ROOT / "manifests/examples/gemma4-26b-a4b-a100-80gb.yaml")
    cluster = objects[0]["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    worker = cluster["workerGroupSpecs"][0]
    assert (worker["minReplicas"], worker["maxReplicas"], worker["numOfHosts"]) == (1, 4, 1)
    args = yaml.safe_load(objects[0]["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["autoscaling"]["max_replicas"] == 4
    assert "revision" not in args["engine"]  # none given: vLLM takes the default branch
    env = {e["name"]: e for e in worker["template"]["spec"]["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}


def test_every_child_is_owned_and_labelled() -> None:
    for obj in _render(ROOT / "manifests/examples/mixtral-8x7b-2xa100-40gb.yaml"):
        meta = obj["metadata"]
        assert meta["labels"][LABEL_DEPLOYMENT] == "mixtral"
        (ref,) = meta["ownerReferences"]
        assert ref["uid"] == UID and ref["controller"] is True and ref["kind"] == "MoEDeployment"
        assert meta["namespace"] == "llm"


def test_network_policy_is_optional_and_hides_the_dashboard() -> None:
    manifest = load(ROOT / "manifests/examples/gemma4-26b-a4b-a100-80gb.yaml")
    spec = MoEDeploymentSpec.model_validate(manifest["spec"])
    owner = Owner("gemma4", "llm", UID)
    assert not any(o["kind"] == "NetworkPolicy" for o in render(owner, spec, plan(spec)))
    spec = MoEDeploymentSpec.model_validate(
        {**manifest["spec"], "networkPolicy": {"enabled": True}}
    )
    (policy,) = [o for o in render(owner, spec, plan(spec)) if o["kind"] == "NetworkPolicy"]
    kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
    client_rule = policy["spec"]["ingress"][0]
    assert {p["port"] for p in client_rule["ports"]} == {8000, 9000}
    kuberay_rule = policy["spec"]["ingress"][2]
    assert 8265 in {p["port"] for p in kuberay_rule["ports"]}
    assert "namespaceSelector" in kuberay_rule["from"][0]


def test_local_sources_are_refused_for_clusters() -> None:
    spec = MoEDeploymentSpec.model_validate(load(ROOT / "manifests/examples/tiny-cpu.yaml")["spec"])
    with pytest.raises(RenderError, match="only works with `moectl up`"):
        render(Owner("tiny", "default", UID), spec, None)  # type: ignore[arg-type]


def test_endpoints() -> None:
    spec = MoEDeploymentSpec.model_validate(
        load(ROOT / "manifests/examples/gemma4-26b-a4b-a100-80gb.yaml")["spec"]
    )
    assert endpoints(Owner("gemma4", "llm", UID), spec) == {
        "http": "http://gemma4-http.llm.svc:8000/v1",
        "grpc": "gemma4-grpc.llm.svc:9000",
    }
