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

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from moe_operator import live_poller, settings
from moe_operator.api import MoEDeployment
from moe_operator.planner import plan
from moe_operator.render import Owner, ray_service
from moe_operator.status import Inputs, compute
from moe_serving import live_state
from tests.support.waiting import change_under_load, wait_until

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
        wait_until(
            lambda: (
                httpx.get(f"{base}/api/serve/applications/", headers=AUTH, timeout=10).status_code
                == 200
            ),
            120,
            1,
            "the Ray dashboard's Serve API never came up",
            ignore=(httpx.HTTPError,),
        )
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


def _deploy(dashboard: str, serve_config: dict[str, Any]) -> dict[str, Any]:
    """PUT the config as KubeRay does; the Serve state once the app runs exactly this config."""
    put = httpx.put(
        f"{dashboard}/api/serve/applications/", json=serve_config, headers=AUTH, timeout=60
    )
    assert put.status_code == 200, put.text
    wanted = serve_config["applications"][0]["args"]

    def running() -> tuple[dict[str, Any], bool]:
        state = httpx.get(f"{dashboard}/api/serve/applications/", headers=AUTH, timeout=30).json()
        app = (state.get("applications") or {}).get("moe") or {}
        status = app.get("status")
        deployed = (app.get("deployed_app_config") or {}).get("args")
        if status == "RUNNING" and deployed == wanted:
            return state, True
        assert status not in ("DEPLOY_FAILED", "UNHEALTHY"), json.dumps(state)[-3000:]
        return state, False

    state, _ = wait_until(
        running,
        420,
        1,
        lambda last: f"app never reached RUNNING: {json.dumps(last[0])[-3000:]}",
        ok=lambda found: found[1],
    )
    return state


def test_rendered_serve_config_deploys_serves_and_reports_ready(
    rendered: dict[str, Any], ray_head: str
) -> None:
    # KubeRay converts serveConfigV2 (YAML) to JSON and PUTs it to the dashboard.
    serve_config = yaml.safe_load(rendered["rs"]["spec"]["serveConfigV2"])
    assert rendered["rs"]["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    unauthenticated = httpx.get(f"{ray_head}/api/serve/applications/", timeout=30)
    assert unauthenticated.status_code == 401  # the dashboard is not open to anyone
    state = _deploy(ray_head, serve_config)

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


async def test_operator_reads_the_live_state_of_the_served_app(
    rendered: dict[str, Any], ray_head: str
) -> None:
    """The operator's own reader (live_poller) against the app the previous test deployed:
    replicas, queue depth, token rate and cost come out of the real /v1/moe/state."""
    _deploy(ray_head, yaml.safe_load(rendered["rs"]["spec"]["serveConfigV2"]))
    url = f"http://127.0.0.1:{HTTP_PORT}/v1/moe/state"
    changed: list[tuple[str, str]] = []
    # The CPU plan is priced at $0/hour; a price makes the cost arithmetic visible.
    assert rendered["plan"].hourly_cost_per_replica == 0.0
    hourly = 3.0
    poller = live_poller.LivePoller(
        config=settings.load({}),
        api=lambda: pytest.fail("standalone: no API call expected"),
        peering=None,
        targets=lambda: [live_poller.Target(("default", "tiny"), url, hourly)],
        changed=changed.append,
    )
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{HTTP_PORT}/v1", api_key="none")
    try:
        # A rate needs two samples of the same reporting replicas: start once the replica's
        # first report (every REPORT_INTERVAL_S) is on the board.
        deadline = time.monotonic() + 60
        await poller.round()
        while poller.samples[("default", "tiny")].reporting_replicas < 1:
            assert time.monotonic() < deadline, poller.samples[("default", "tiny")]
            await asyncio.sleep(live_state.REPORT_INTERVAL_S)
            await poller.round()
        first = poller.status[("default", "tiny")]
        assert first.serving_replicas == 1 and first.desired_replicas == 1
        assert first.output_tokens_per_second is None  # one sample: no rate yet
        generated = 0
        for _ in range(3):
            reply = await client.completions.create(
                model="tiny-moe", prompt="The river", max_tokens=16, extra_body={"ignore_eos": True}
            )
            assert reply.usage is not None
            generated += reply.usage.completion_tokens
        # The replica reports every few seconds; read until its counter has the new tokens.
        deadline = time.monotonic() + 60
        while True:
            await asyncio.sleep(live_state.REPORT_INTERVAL_S)
            await poller.round()
            sample = poller.samples[("default", "tiny")]
            if sample.generated_tokens_total >= generated:
                break
            assert time.monotonic() < deadline, sample
        value = poller.status[("default", "tiny")]
        assert value.output_tokens_per_second is not None and value.output_tokens_per_second > 0
        assert value.cost_per_million_tokens == pytest.approx(
            hourly / (value.output_tokens_per_second * 3600) * 1e6, rel=1e-2
        )
        assert value.queue_depth == 0.0
        assert changed, "a changed value marks the owner for a status write"
    finally:
        await client.close()
        if poller.session is not None:
            await poller.session.close()


def test_config_change_rolls_under_load_without_failed_requests(
    rendered: dict[str, Any], ray_head: str
) -> None:
    """A spec change that KubeRay applies in place (new serveConfigV2 PUT to the running
    cluster) while clients keep sending: every request gets its answer."""
    old = yaml.safe_load(rendered["rs"]["spec"]["serveConfigV2"])
    _deploy(ray_head, old)
    dep = rendered["dep"]
    spec = dep.spec.model_copy(deep=True)
    spec.serving.request_timeout_seconds = dep.spec.serving.request_timeout_seconds + 30
    owner = Owner(dep.metadata.name, dep.metadata.namespace, "uid-1", generation=2)
    config = json.loads((Path(spec.model.source) / "config.json").read_text())
    new_rs = ray_service(owner, spec, plan(spec, model_config=config))
    new = yaml.safe_load(new_rs["spec"]["serveConfigV2"])
    assert new != old

    stop = threading.Event()
    outcomes: list[str] = []

    def client_loop() -> None:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{HTTP_PORT}/v1", api_key="none", max_retries=0, timeout=300
        )
        while not stop.is_set():
            try:
                reply = client.completions.create(
                    model="tiny-moe", prompt="The river", max_tokens=4
                )
                outcomes.append("ok" if reply.choices[0].text is not None else "empty")
            except Exception as exc:  # every failure is reported by the test
                outcomes.append(f"{type(exc).__name__}: {str(exc)[:200]}")

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        # Load flows before the change, during it and after it, on the new replicas.
        during, _ = change_under_load(outcomes, lambda: _deploy(ray_head, new))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=320)
    failed = [o for o in outcomes if o != "ok"]
    print(f"rolling change: {len(outcomes)} requests, {during} answered during the roll")
    assert failed == [], failed[:5]
