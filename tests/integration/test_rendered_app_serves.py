"""What the operator renders really serves: the RayService's serveConfigV2, sent the way KubeRay
sends it (PUT to the Ray dashboard's Serve REST API, /api/serve/applications/), deploys on a real
local Ray cluster, answers a completion, and the operator's status logic reports Ready from the
resulting state.

Two stand-ins, because no Kubernetes or GPU exists here: the MoEDeployment is the tiny CPU example
with its source pointed at a local checkpoint (the cluster renderer refuses local sources, so the
RayService is built with `render.ray_service`, the function `render.render` uses after that
check), and the RayService status is assembled from the Serve REST API's answer the way KubeRay
fills it (`activeServiceStatus.applicationStatuses`, a Ready condition).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from moe_operator.api import MoEDeployment
from moe_operator.planner import plan
from moe_operator.render import Owner, ray_service
from moe_operator.status import Inputs, compute

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = 28265
TOKEN = "moe-test-" + os.urandom(8).hex()
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HTTP_PORT, GRPC_PORT = 28000, 29000  # outside Ray's worker port range (10002-19999)


def _ray(*args: str) -> subprocess.CompletedProcess[str]:
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    return subprocess.run([ray, *args], capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from moe_serving.tinymodel import make_model

    model_dir = make_model("gemma4", tmp_path_factory.mktemp("tiny") / "gemma4", seed=0)
    manifest = yaml.safe_load((ROOT / "manifests/examples/tiny-cpu.yaml").read_text())
    manifest["spec"]["model"]["source"] = str(model_dir)
    manifest["spec"]["serving"].update(httpPort=HTTP_PORT, grpcPort=GRPC_PORT)
    dep = MoEDeployment.model_validate(manifest)
    config = json.loads((model_dir / "config.json").read_text())
    the_plan = plan(dep.spec, model_config=config)
    owner = Owner(dep.metadata.name, dep.metadata.namespace, "uid-1", generation=1)
    return {"rs": ray_service(owner, dep.spec, the_plan), "plan": the_plan, "dep": dep}


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    _ray("stop", "--force")
    # The rendered RayService asks KubeRay for token auth (authOptions.mode=token); do the same.
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN)
    started = _ray(
        "start",
        "--head",
        "--num-cpus=2",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={DASHBOARD}",
        "--include-dashboard=true",
        "--disable-usage-stats",
    )
    assert started.returncode == 0, started.stderr[-2000:]
    base = f"http://127.0.0.1:{DASHBOARD}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if (
                    httpx.get(
                        f"{base}/api/serve/applications/", headers=AUTH, timeout=10
                    ).status_code
                    == 200
                ):
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the Ray dashboard's Serve API never came up"
            time.sleep(1)
        yield base
    finally:
        _ray("stop", "--force")
        for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
            os.environ.pop(key, None)


def _kuberay_status(serve_state: dict[str, Any]) -> dict[str, Any]:
    """The RayService status KubeRay derives from the Serve REST API (stand-in for KubeRay)."""
    apps = {
        name: {"status": app.get("status"), "message": app.get("message", "")}
        for name, app in (serve_state.get("applications") or {}).items()
    }
    running = bool(apps) and all(a["status"] == "RUNNING" for a in apps.values())
    return {
        "observedGeneration": 1,
        "conditions": [
            {
                "type": "Ready",
                "status": "True" if running else "False",
                "reason": "RayServiceReady" if running else "Initializing",
            }
        ],
        "activeServiceStatus": {
            "applicationStatuses": apps,
            "rayClusterStatus": {
                "readyWorkerReplicas": 1 if running else 0,
                "availableWorkerReplicas": 1 if running else 0,
            },
        },
    }


def test_rendered_serve_config_deploys_serves_and_reports_ready(
    rendered: dict[str, Any], ray_head: str
) -> None:
    # KubeRay converts serveConfigV2 (YAML) to JSON and PUTs it to the dashboard.
    serve_config = yaml.safe_load(rendered["rs"]["spec"]["serveConfigV2"])
    assert rendered["rs"]["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    unauthenticated = httpx.get(f"{ray_head}/api/serve/applications/", timeout=30)
    assert unauthenticated.status_code == 401  # the dashboard is not open to anyone
    put = httpx.put(
        f"{ray_head}/api/serve/applications/", json=serve_config, headers=AUTH, timeout=60
    )
    assert put.status_code == 200, put.text

    deadline = time.monotonic() + 420
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = httpx.get(f"{ray_head}/api/serve/applications/", headers=AUTH, timeout=30).json()
        statuses = {n: a.get("status") for n, a in (state.get("applications") or {}).items()}
        if statuses.get("moe") == "RUNNING":
            break
        assert statuses.get("moe") not in ("DEPLOY_FAILED", "UNHEALTHY"), json.dumps(state)[-3000:]
        time.sleep(3)
    else:
        pytest.fail(f"app never reached RUNNING: {json.dumps(state)[-3000:]}")

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{HTTP_PORT}/v1", api_key="none")
    reply = client.completions.create(
        model="tiny-moe", prompt="The river", max_tokens=8, temperature=0
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 8

    # The operator's status logic, fed what KubeRay would report for this state.
    rs = dict(rendered["rs"], status=_kuberay_status(state))
    rs["metadata"] = dict(rs["metadata"], generation=1)
    status = compute(
        Inputs(
            name="tiny",
            generation=1,
            now="2026-01-01T00:00:00Z",
            plan=rendered["plan"].status_summary(),
            ray_service=rs,
        )
    )
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "True", conditions
    assert conditions["Progressing"]["status"] == "False", conditions
    assert conditions["Degraded"]["status"] == "False", conditions
    assert status["readyReplicas"] == 1
