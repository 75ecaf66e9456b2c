"""manifests/gateway/grpc-tls.yaml (TLS for gRPC in front of Ray Serve's plaintext proxy)
routes to the gRPC port of KubeRay's serve Service, as the operator shapes it (serveService)
for the example it names."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from moe_operator.api import MoEDeploymentSpec
from moe_operator.planner import plan
from moe_operator.render import Owner, render

ROOT = Path(__file__).resolve().parents[2]
GATEWAY = ROOT / "manifests" / "gateway" / "grpc-tls.yaml"
EXAMPLE = ROOT / "manifests" / "examples" / "mixtral-8x7b-2xa100-40gb.yaml"
PROTO = ROOT / "serving" / "moe_serving" / "proto" / "inference.proto"


def _docs() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(GATEWAY.read_text()) if d}


def test_route_targets_the_rendered_grpc_service_and_our_grpc_service_name() -> None:
    docs = _docs()
    gateway, route = docs["Gateway"], docs["GRPCRoute"]
    body = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"] = {"name": "mixtral", "namespace": "llm"}
    spec = MoEDeploymentSpec.model_validate(body["spec"])
    children = render(Owner("mixtral", "llm", "uid"), spec, plan(spec))
    # A real Service (Gateway backends cannot be ExternalName aliases): KubeRay's serve Service.
    serve = children[0]["spec"]["serveService"]
    backend = route["spec"]["rules"][0]["backendRefs"][0]
    assert backend["name"] == serve["metadata"]["name"]
    (port,) = [p for p in serve["spec"]["ports"] if p["port"] == backend["port"]]
    assert port["name"].startswith("serve-") and port["appProtocol"] == "kubernetes.io/h2c"
    assert route["metadata"]["namespace"] == gateway["metadata"]["namespace"] == "llm"
    # The route matches the gRPC service our proto declares.
    proto = PROTO.read_text()
    package = re.search(r"^package ([\w.]+);", proto, re.M)
    service = re.search(r"^service (\w+)", proto, re.M)
    assert package and service
    method = route["spec"]["rules"][0]["matches"][0]["method"]
    assert method["service"] == f"{package.group(1)}.{service.group(1)}"
    # TLS terminates at the listener the route attaches to.
    listener = next(
        x
        for x in gateway["spec"]["listeners"]
        if x["name"] == route["spec"]["parentRefs"][0]["sectionName"]
    )
    assert listener["tls"]["mode"] == "Terminate" and listener["protocol"] == "HTTPS"
