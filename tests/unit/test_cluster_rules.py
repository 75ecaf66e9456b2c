"""What a real cluster does with the rendered objects: the rules of Kubernetes and KubeRay that
would block a drain, strand pods as Pending, cut traffic or reject the RayService. Each test
names the upstream rule it models (issue #13)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from unit_support import CLUSTER_EXAMPLES, KUBERAY_CRDS, ROOT, load

from moe_operator.api import LABEL_DEPLOYMENT, MoEDeploymentSpec
from moe_operator.catalog import ACCELERATORS
from moe_operator.planner import Plan, plan
from moe_operator.render import Owner, render, serve_service_name

Obj = dict[str, Any]
UID = "8d3f0f5e-0000-4000-8000-000000000001"


def _spec(path: Any, **changes: Any) -> MoEDeploymentSpec:
    body = load(path)["spec"]
    body.update(changes)
    return MoEDeploymentSpec.model_validate(body)


def _children(spec: MoEDeploymentSpec, name: str = "m", ns: str = "llm") -> dict[str, Obj]:
    objs = render(Owner(name, ns, UID), spec, plan(spec))
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in objs}


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ------------------------------------------------------------------------ 1. PodDisruptionBudget


def _kuberay_cluster_has_scale() -> bool:
    """Whether any KubeRay release's RayCluster CRD serves the scale subresource."""
    files = [KUBERAY_CRDS / "ray.io_rayclusters.yaml"]
    files += sorted(KUBERAY_CRDS.glob("versions/*/ray.io_rayclusters.yaml"))
    if not files[0].is_file():
        pytest.skip(f"KubeRay CRDs not found at {KUBERAY_CRDS}")
    return any(
        "scale" in (version.get("subresources") or {})
        for path in files
        for version in yaml.safe_load(path.read_text())["spec"]["versions"]
    )


def disruptions_allowed(pdb: Obj, healthy: int, owner_has_scale: bool) -> int:
    """status.disruptionsAllowed as kubernetes pkg/controller/disruption/disruption.go computes
    it (getExpectedPodCount): maxUnavailable or a percentage minAvailable need the pods'
    controller's scale (getExpectedScale); without one the controller fails the PDB and the
    eviction API sees 0 allowed. An integer minAvailable needs nothing but the pods."""
    spec = pdb["spec"]
    if "maxUnavailable" in spec or isinstance(spec.get("minAvailable"), str):
        if not owner_has_scale:
            return 0
        raise AssertionError("this model covers owners without /scale only")
    return max(healthy - int(spec["minAvailable"]), 0)


def _pdb_case(path: Any) -> tuple[Obj, Plan]:
    spec = _spec(path)
    chosen = plan(spec)
    (pdb,) = [
        o
        for o in render(Owner("m", "llm", UID), spec, chosen)
        if o["kind"] == "PodDisruptionBudget"
    ]
    return pdb, chosen


@pytest.mark.parametrize("path", CLUSTER_EXAMPLES, ids=lambda p: p.name)
def test_a_node_drain_can_evict_an_engine_pod(path: Any) -> None:
    """kubernetes pkg/controller/disruption/disruption.go: the engine pods belong to a
    RayCluster, whose CRD has no scale subresource (checked in every KubeRay release we test),
    so only an integer minAvailable lets the controller allow an eviction. With every engine
    pod of the replica floor healthy, a drain evicts one; then nothing more until the
    replacement is Ready, because the evicted pod already stopped its (multi-host) slice."""
    assert not _kuberay_cluster_has_scale()
    pdb, chosen = _pdb_case(path)
    pods = chosen.min_replicas * chosen.nodes_per_replica
    assert disruptions_allowed(pdb, pods, owner_has_scale=False) == 1
    assert disruptions_allowed(pdb, pods - 1, owner_has_scale=False) == 0
    # A broken slice's not-Ready pods never block a drain (eviction.go, AlwaysAllow).
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_pdb_of_a_multi_host_slice_allows_one_pod_at_a_time() -> None:
    path = ROOT / "manifests/examples/deepseek-v3-4x8xa100-80gb.yaml"
    pdb, chosen = _pdb_case(path)
    assert chosen.nodes_per_replica == 4 and chosen.min_replicas == 1
    assert pdb["spec"]["minAvailable"] == 3
    assert "maxUnavailable" not in pdb["spec"]


def test_the_old_max_unavailable_budget_never_allows_an_eviction() -> None:
    """The model is not vacuous: `maxUnavailable: 1` over RayCluster pods stays at 0."""
    old = {"spec": {"maxUnavailable": 1}}
    assert disruptions_allowed(old, 8, owner_has_scale=False) == 0


# ------------------------------------------------------------------------------ 7. nodeSelector


@pytest.mark.parametrize("accelerator", sorted(a for a in ACCELERATORS if a != "CPU"))
def test_worker_pods_get_only_the_users_node_selector(accelerator: str) -> None:
    """kube-scheduler's NodeAffinity filter (pkg/scheduler/framework/plugins/nodeaffinity)
    keeps a pod Pending while no node has every nodeSelector label. `nvidia.com/gpu.product` is
    set by NVIDIA GPU Feature Discovery (not a stated prerequisite) and differs on PCIe/NVL
    parts, so the operator adds no label of its own: the spec's nodeSelector is the selector."""
    path = ROOT / "manifests/examples/mixtral-8x7b-2xa100-40gb.yaml"
    body = load(path)["spec"]
    body["resources"] = {**body["resources"], "accelerator": accelerator, "nodeSelector": {}}
    body["model"]["quantization"] = "fp8"
    spec = MoEDeploymentSpec.model_validate(body)
    worker = _children(spec)["RayService/m"]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert "nodeSelector" not in worker["template"]["spec"]
    body["resources"]["nodeSelector"] = {"nvidia.com/gpu.product": "NVIDIA-A100-PCIE-40GB"}
    spec = MoEDeploymentSpec.model_validate(body)
    worker = _children(spec)["RayService/m"]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert worker["template"]["spec"]["nodeSelector"] == {
        "nvidia.com/gpu.product": "NVIDIA-A100-PCIE-40GB"
    }


# ------------------------------------------------------------------------------ 8. NetworkPolicy


def ingress_allowed(policy: Obj, ns: str, labels: dict[str, str], port: int) -> bool:
    """NetworkPolicy ingress semantics (k8s.io/api networking/v1 types.go,
    NetworkPolicyIngressRule / NetworkPolicyPeer): rules are OR-ed; a rule with no `ports`
    allows every port; a peer with namespaceSelector and podSelector needs both; a peer with a
    podSelector only means pods of the policy's own namespace."""
    own_ns = policy["metadata"]["namespace"]
    for rule in policy["spec"].get("ingress", []):
        ports = rule.get("ports")
        if ports and not any(p["port"] == port for p in ports):
            continue
        for peer in rule.get("from", []):
            ns_sel = peer.get("namespaceSelector")
            pod_sel = peer.get("podSelector")
            ns_labels = {"kubernetes.io/metadata.name": ns}
            ns_ok = _matches(ns_sel.get("matchLabels", {}), ns_labels) if ns_sel else ns == own_ns
            pod_ok = _matches(pod_sel.get("matchLabels", {}), labels) if pod_sel else True
            if ns_ok and pod_ok:
                return True
    return False


def _policy(**network_policy: Any) -> Obj:
    spec = _spec(
        ROOT / "manifests/examples/gemma4-26b-a4b-a100-80gb.yaml",
        networkPolicy={"enabled": True, **network_policy},
    )
    return _children(spec, "gemma4")["NetworkPolicy/gemma4"]


def test_network_policy_lets_the_operator_and_prometheus_read_the_http_port() -> None:
    """The operator reads GET /v1/moe/state and Prometheus scrapes /metrics on the HTTP port,
    each from its own namespace; a policy that selects the pods drops whatever it does not
    allow (NetworkPolicy semantics, see ingress_allowed)."""
    policy = _policy()
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    assert ingress_allowed(policy, "moe-system", {"app": "anything"}, 8000)
    assert ingress_allowed(policy, "monitoring", prometheus, 8000)
    # Only what they need: not gRPC, not the dashboard, not other pods of those namespaces.
    assert not ingress_allowed(policy, "moe-system", {}, 9000)
    assert not ingress_allowed(policy, "monitoring", prometheus, 8265)
    assert not ingress_allowed(policy, "monitoring", {"app": "grafana"}, 8000)
    assert not ingress_allowed(policy, "elsewhere", prometheus, 8000)
    # Clients of the namespace and KubeRay keep their access.
    assert ingress_allowed(policy, "llm", {}, 8000) and ingress_allowed(policy, "llm", {}, 9000)
    assert ingress_allowed(policy, "ray-system", {}, 8265)
    assert not ingress_allowed(policy, "llm", {}, 8265)


def test_network_policy_namespaces_follow_the_spec() -> None:
    policy = _policy(
        operatorNamespace="ops", prometheusNamespace="obs", prometheusPodLabels={"team": "sre"}
    )
    assert ingress_allowed(policy, "ops", {}, 8000)
    assert not ingress_allowed(policy, "moe-system", {}, 8000)
    assert ingress_allowed(policy, "obs", {"team": "sre"}, 8000)
    assert not ingress_allowed(policy, "monitoring", {"app.kubernetes.io/name": "prometheus"}, 8000)
    no_scrape = _policy(prometheusNamespace="")
    assert not ingress_allowed(
        no_scrape, "monitoring", {"app.kubernetes.io/name": "prometheus"}, 8000
    )


# ------------------------------------------------------------- 5. routing through KubeRay's Service


def kuberay_serve_service(ray_service: Obj, cluster: str) -> Obj:
    """The serve Service KubeRay builds for a RayService whose serving cluster is `cluster`:
    ray-project/kuberay ray-operator/controllers/ray/common/service.go, BuildServeService
    (KubeRay >= 1.6): the selector is always {ray.io/cluster: <serving cluster>,
    ray.io/serve: "true"} (custom selectors ignored); the ports are the head container's named
    "serve" or "serve-*" (isServingPort), a serveService port of the same name replacing the
    detected one; the name is serveService.metadata.name, else <rayservice>-serve-svc."""
    spec = ray_service["spec"]
    custom = spec.get("serveService") or {}
    head = spec["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    detected = [
        {"name": p["name"], "port": p["containerPort"]}
        for p in head.get("ports", [])
        if p["name"] == "serve" or p["name"].startswith("serve-")
    ]
    user = {p["name"]: p for p in custom.get("spec", {}).get("ports", [])}
    name = custom.get("metadata", {}).get("name") or f"{ray_service['metadata']['name']}-serve-svc"
    return {
        "name": name,
        "selector": {"ray.io/cluster": cluster, "ray.io/serve": "true"},
        "ports": [user.get(p["name"], p) for p in detected],
    }


def _pods(ray_service: Obj, cluster: str) -> list[dict[str, str]]:
    """Labels of a cluster's pods whose Serve proxy is healthy, as KubeRay sets them."""
    config = ray_service["spec"]["rayClusterConfig"]
    groups = [config["headGroupSpec"], *config["workerGroupSpecs"]]
    return [
        {**g["template"]["metadata"]["labels"], "ray.io/cluster": cluster, "ray.io/serve": "true"}
        for g in groups
    ]


def test_during_a_new_cluster_upgrade_clients_reach_one_cluster_only() -> None:
    """A NewCluster upgrade runs the old (active) and new (pending) RayCluster side by side,
    both with healthy Serve proxies labelled ray.io/serve=true. KubeRay's serve Service selects
    the active cluster and switches to the pending one once it is ready (service.go,
    BuildServeService, re-run by the RayService controller on the switch). The operator's
    -http / -grpc Services are aliases of that Service, so they follow the switch and never
    select pods of their own."""
    spec = _spec(ROOT / "manifests/examples/mixtral-8x7b-2xa100-40gb.yaml")
    children = _children(spec, "mixtral")
    ray_service = children["RayService/mixtral"]
    old, new = "mixtral-abc12", "mixtral-def34"
    pods = {old: _pods(ray_service, old), new: _pods(ray_service, new)}
    for alias, port in (("mixtral-http", 8000), ("mixtral-grpc", 9000)):
        service = children[f"Service/{alias}"]["spec"]
        assert "selector" not in service and service["type"] == "ExternalName"
        target = service["externalName"].split(".")
        assert target[:3] == [serve_service_name("mixtral"), "llm", "svc"]
        for serving in (old, new):  # before and after KubeRay switches
            kuberay = kuberay_serve_service(ray_service, serving)
            assert kuberay["name"] == target[0]
            assert port in [p["port"] for p in kuberay["ports"]]
            reached = {
                c
                for c, labels in pods.items()
                for pod in labels
                if _matches(kuberay["selector"], pod)
            }
            assert reached == {serving}
    # The old selector matched both clusters' proxies during the upgrade.
    old_selector = {LABEL_DEPLOYMENT: "mixtral", "ray.io/serve": "true"}
    both = {c for c, labels in pods.items() for pod in labels if _matches(old_selector, pod)}
    assert both == {old, new}


def test_kuberay_keeps_our_port_protocols_and_labels() -> None:
    spec = _spec(ROOT / "manifests/examples/mixtral-8x7b-2xa100-40gb.yaml")
    ray_service = _children(spec, "mixtral")["RayService/mixtral"]
    kuberay = kuberay_serve_service(ray_service, "mixtral-abc12")
    protocols = {p["port"]: p.get("appProtocol") for p in kuberay["ports"]}
    assert protocols == {8000: "http", 9000: "kubernetes.io/h2c"}
    labels = ray_service["spec"]["serveService"]["metadata"]["labels"]
    assert labels[LABEL_DEPLOYMENT] == "mixtral"


# ------------------------------------------------------ 6. KubeRay's incremental-upgrade validation


def kuberay_upgrade_problem(ray_service: Obj) -> str | None:
    """ray-project/kuberay ray-operator/controllers/ray/utils/validation.go,
    ValidateClusterUpgradeOptions (run for NewClusterWithIncrementalUpgrade): the in-tree
    autoscaler (IsAutoscalingEnabled), clusterUpgradeOptions with percents in 0..100,
    stepSizePercent <= maxSurgePercent, intervalSeconds > 0 and a gatewayClassName."""
    spec = ray_service["spec"]
    if spec.get("upgradeStrategy", {}).get("type") != "NewClusterWithIncrementalUpgrade":
        return None
    if not spec["rayClusterConfig"].get("enableInTreeAutoscaling"):
        return "Ray Autoscaler is required for NewClusterWithIncrementalUpgrade"
    options = spec["upgradeStrategy"].get("clusterUpgradeOptions")
    if options is None:
        return "ClusterUpgradeOptions are required for NewClusterWithIncrementalUpgrade"
    surge, step = options.get("maxSurgePercent", 100), options.get("stepSizePercent")
    if not 0 <= surge <= 100 or step is None or not 0 <= step <= surge:
        return "bad percents"
    if not options.get("intervalSeconds", 0) > 0:
        return "intervalSeconds must be greater than 0"
    if not options.get("gatewayClassName"):
        return "gatewayClassName is required for NewClusterWithIncrementalUpgrade"
    return None


GEMMA = ROOT / "manifests/examples/gemma4-26b-a4b-a100-80gb.yaml"


def test_incremental_upgrade_renders_what_kuberay_accepts() -> None:
    spec = _spec(
        GEMMA, upgradeStrategy="NewClusterWithIncrementalUpgrade", gatewayClassName="cilium"
    )
    ray_service = _children(spec)["RayService/m"]
    assert kuberay_upgrade_problem(ray_service) is None
    options = ray_service["spec"]["upgradeStrategy"]["clusterUpgradeOptions"]
    assert options["gatewayClassName"] == "cilium"


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"replicas": 2}, "autoscaling.enabled"),
        ({"autoscaling": {"enabled": False}}, "autoscaling.enabled"),
        ({"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 2}}, "minReplicas"),
        ({"gatewayClassName": None}, "gatewayClassName"),
    ],
)
def test_incremental_upgrade_without_what_kuberay_needs_is_refused(
    changes: dict[str, Any], expected: str
) -> None:
    """Refused at the API (model, webhook and CRD rule below) instead of a RayService KubeRay
    rejects (validation.go, ValidateClusterUpgradeOptions), which left the MoEDeployment
    Progressing forever; the message says how to fix it."""
    body = {
        **load(GEMMA)["spec"],
        "upgradeStrategy": "NewClusterWithIncrementalUpgrade",
        "gatewayClassName": "istio",
        **changes,
    }
    if body["gatewayClassName"] is None:
        del body["gatewayClassName"]
    with pytest.raises(ValidationError, match=expected) as info:
        MoEDeploymentSpec.model_validate(body)
    assert "NewClusterWithIncrementalUpgrade" in str(info.value)
    # What the model refuses, the CRD's CEL rules refuse too.
    assert _cel_failures(body)


def _cel_failures(spec_body: dict[str, Any]) -> list[str]:
    """Messages of the spec-level CEL rules of the generated CRD that fail for this spec (after
    the defaults the API server applies, i.e. the model's)."""
    celpy = pytest.importorskip("celpy")
    from celpy import celtypes

    crd = yaml.safe_load((ROOT / "charts/moe-operator/crds/moedeployments.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    defaulted = dict(spec_body)
    defaulted.setdefault("upgradeStrategy", "NewCluster")
    defaulted["autoscaling"] = {
        "enabled": False,
        "minReplicas": 1,
        "maxReplicas": 1,
        "scaleToZero": False,
        **spec_body.get("autoscaling", {}),
    }
    env = celpy.Environment()
    failures = []
    for rule in schema["x-kubernetes-validations"]:
        program = env.program(env.compile(rule["rule"]))
        result = program.evaluate({"self": celpy.json_to_cel(defaulted)})
        if result != celtypes.BoolType(True):
            failures.append(rule["message"])
    return failures


def test_cel_rules_pass_a_valid_incremental_spec() -> None:
    body = {
        **load(GEMMA)["spec"],
        "upgradeStrategy": "NewClusterWithIncrementalUpgrade",
        "gatewayClassName": "istio",
    }
    MoEDeploymentSpec.model_validate(body)
    assert _cel_failures(body) == []


# ------------------------------------------- incremental upgrade: what KubeRay creates to route to


def kuberay_routing_objects(ray_service: Obj, active: str | None, pending: str | None) -> set[str]:
    """`Kind/name` of the objects KubeRay creates to route traffic to a RayService, by upgrade
    strategy (ray-project/kuberay ray-operator/controllers/ray):

    * common/service.go BuildServeService: for a RayService the Service is named after the
      RayService, `<name>-serve-svc` (or serveService.metadata.name), *unless*
      IsIncrementalUpgradeEnabled: then it is named after each RayCluster, `<cluster>-serve-svc`,
      and a custom serveService is ignored; rayservice_controller.go
      reconcilePerClusterServeService makes one per active and pending cluster.
    * rayservice_controller.go createGateway / createHTTPRoute (incremental only): Gateway
      `<name>-gateway` with one listener "http" on port 80 (utils/constant.go
      GatewayListenerPortName, DefaultGatewayListenerPort), HTTPRoute `<name>-httproute` whose
      backends are the per-cluster serve Services.
    """
    name = ray_service["metadata"]["name"]
    strategy = (ray_service["spec"].get("upgradeStrategy") or {}).get("type")
    if strategy != "NewClusterWithIncrementalUpgrade":
        return {f"Service/{kuberay_serve_service(ray_service, active or pending or '')['name']}"}
    clusters = [c for c in (active, pending) if c]
    return {f"Service/{c}-serve-svc" for c in clusters} | {
        f"Gateway/{name}-gateway",
        f"HTTPRoute/{name}-httproute",
    }


@pytest.mark.parametrize("strategy", ["NewCluster", "None", "NewClusterWithIncrementalUpgrade"])
def test_aliases_and_live_state_point_at_what_kuberay_creates(strategy: str) -> None:
    """Every ExternalName alias the operator renders, and the URL it reads the live state
    from, name a Service KubeRay creates under the spec's upgrade strategy. Under
    NewClusterWithIncrementalUpgrade there is no `<name>-serve-svc`: before, the -http/-grpc
    aliases pointed at nothing and every live-state read failed."""
    from moe_operator.render import endpoints, serving_base_url

    changes: dict[str, Any] = {"upgradeStrategy": strategy}
    if strategy == "NewClusterWithIncrementalUpgrade":
        changes["gatewayClassName"] = "istio"
    spec = _spec(GEMMA, **changes)
    owner = Owner("m", "llm", UID)
    children = _children(spec)
    ray_service = children["RayService/m"]
    for active, pending in (("m-abc12", None), ("m-abc12", "m-def34")):
        created = kuberay_routing_objects(ray_service, active, pending)
        aliases = [o for o in children.values() if o["spec"].get("type") == "ExternalName"]
        for alias in aliases:
            target = alias["spec"]["externalName"].split(".")
            assert target[1:3] == ["llm", "svc"]
            assert f"Service/{target[0]}" in created, (alias["metadata"]["name"], created)
        status = {"activeServiceStatus": {"rayClusterName": active}}
        if pending:
            status["pendingServiceStatus"] = {"rayClusterName": pending}
        base = serving_base_url(owner, spec, {**ray_service, "status": status})
        assert base is not None
        host = base.removeprefix("http://").split(".")[0]
        assert f"Service/{host}" in created
        if strategy == "NewClusterWithIncrementalUpgrade":
            assert host == f"{active}-serve-svc"  # the active cluster's
            assert aliases == []
            gateway = endpoints(owner, spec)["gateway"]
            assert gateway == "llm/m-gateway:80" and "Gateway/m-gateway" in created
        else:
            assert {a["metadata"]["name"] for a in aliases} == {"m-http", "m-grpc"}
            assert set(endpoints(owner, spec)) == {"http", "grpc"}
    if strategy == "NewClusterWithIncrementalUpgrade":
        # No active cluster yet (first rollout): nothing to read from.
        assert serving_base_url(owner, spec, {**ray_service, "status": {}}) is None
