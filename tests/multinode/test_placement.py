"""Placement proof: the serveConfigV2 the operator renders is placed by Ray's real scheduler and
Serve's real (gang) placement on a local multi-node cluster shaped like the example's nodes.

For every GPU example and a few planner layouts beyond them: `moectl render` (the CLI, as a user
runs it) gives the RayService; the local cluster has the nodes KubeRay would start for it (see
`kuberay_shapes`: CPUs, memory and GPUs from the pod template, the accelerator_type resource as
Ray's autodetection names it); its `serveConfigV2` is PUT to the Ray dashboard's Serve REST API
the way KubeRay sends it. Two things differ from the rendered config, both stated:
`import_path` names the stand-in builder (the real `moe_serving.app.build` with an engine that
loads no model), and the proxies run on the head only, on free ports (all nodes share one
machine's ports, so proxies on every node would fight over one port and restart forever).

Then, for every MoEDeployment replica: every rank is placed, ranks of one replica span exactly
the planned number of nodes, rank r sits on the plan's node (ranks the plan puts on one node
share a Ray node, others do not) and on the plan's GPU index there (Ray's GPU id of a task in
that rank's bundle), no GPU is given twice, DP rank 0 (the rendezvous) is on the node of global
rank 0, and every node holding ranks hosts a Serve replica, hence (under the rendered
`proxy_location: EveryNode`) a Serve proxy: Serve runs proxies on the head and on nodes with
replicas (ray/serve/_private/controller.py, `_update_proxy_nodes`), and a proxy is what KubeRay's
worker readiness probe checks (ray-operator/controllers/ray/common/pod.go,
`initLivenessAndReadinessProbe`). The application must become RUNNING.

Before the accelerator-name and DP-gang fixes this failed: bundles asked for
`accelerator_type:A100-80G`, which no node has (Ray only auto-adds `A100`,
ray/util/accelerators/accelerators.py), so nothing was ever placed; and DP32 ran as one engine
whose 32 cores all took bundle 0's GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from kuberay_shapes import cluster_shape
from standin_engine import KV_PREFIX

from moe_operator.api import MoEDeployment
from moe_operator.planner import Plan, plan
from moe_serving.local_cluster import LocalCluster
from tests.support.ports import free_port
from tests.support.waiting import wait_until

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "manifests" / "examples"


def _layout(name: str, **overrides: Any) -> tuple[str, dict[str, Any]]:
    """An example manifest with spec fields overridden (a planner layout beyond the examples)."""
    manifest = yaml.safe_load((EXAMPLES / name).read_text())
    for path, value in overrides.items():
        node = manifest["spec"]
        keys = path.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return name, manifest


LAYOUTS = {
    # Every GPU example, unchanged.
    "deepseek-v3 DP32xEP32 4x8 A100-80GB": _layout("deepseek-v3-4x8xa100-80gb.yaml"),
    "gemma4 TP2xEP2 A100-80GB": _layout("gemma4-26b-a4b-a100-80gb.yaml"),
    "mixtral-8x7b 2 replicas TP2xEP2 A100-40GB": _layout("mixtral-8x7b-2xa100-40gb.yaml"),
    # Beyond them: DP ranks of TP2 spread over two 2-GPU nodes (TP peers must share a node).
    "gemma4 TP2xDP2 over 2 nodes": _layout(
        "gemma4-26b-a4b-a100-80gb.yaml",
        **{
            "resources.gpusPerNode": 2,
            "resources.maxNodesPerReplica": 2,
            "parallelism.tensorParallelSize": 2,
            "parallelism.dataParallelSize": 2,
            "autoscaling.enabled": False,
        },
    ),
    # Two DP-gang replicas side by side on H100 nodes (gangs must not interleave).
    "gemma4 DP4xEP4 x2 replicas over 2x2 H100 each": _layout(
        "gemma4-26b-a4b-a100-80gb.yaml",
        **{
            "resources.accelerator": "H100-80GB",
            "resources.gpusPerNode": 2,
            "resources.maxNodesPerReplica": 2,
            "parallelism.tensorParallelSize": 1,
            "parallelism.dataParallelSize": 4,
            "autoscaling.enabled": False,
            "replicas": 2,
        },
    ),
}


def _render(manifest: dict[str, Any], tmp: Path) -> dict[str, Any]:
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(manifest))
    moectl = Path(sys.executable).parent / "moectl"
    done = subprocess.run(
        [str(moectl), "render", "-f", str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return next(o for o in yaml.safe_load_all(done.stdout) if o and o["kind"] == "RayService")


def _deploy(dashboard: str, config: dict[str, Any], auth: dict[str, str]) -> dict[str, Any]:
    # With token auth, as the rendered RayService asks KubeRay for (authOptions.mode: token).
    put = httpx.put(f"{dashboard}/api/serve/applications/", json=config, headers=auth, timeout=60)
    assert put.status_code == 200, put.text

    def status() -> tuple[dict[str, Any], Any]:
        state = httpx.get(f"{dashboard}/api/serve/applications/", headers=auth, timeout=30).json()
        app = (state.get("applications") or {}).get("moe") or {}
        assert app.get("status") not in ("DEPLOY_FAILED", "UNHEALTHY"), json.dumps(app)[-3000:]
        return state, app.get("status")

    state, _ = wait_until(
        status,
        600,
        2,
        lambda last: f"the application never became RUNNING: {json.dumps(last[0])[-3000:]}",
        ok=lambda found: found[1] == "RUNNING",
    )
    return state


def _records() -> list[dict[str, Any]]:
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

    return [json.loads(_internal_kv_get(k)) for k in _internal_kv_list(KV_PREFIX)]


def _gpu_of(pg_id: str, bundle: int) -> tuple[str, list[int]]:
    """(node id, GPU ids) Ray gives a task that takes one GPU of this bundle."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id)))

    @ray.remote(num_cpus=0, num_gpus=1)
    def probe() -> tuple[str, list[int]]:
        return ray.get_runtime_context().get_node_id(), [int(g) for g in ray.get_gpu_ids()]

    strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle)
    return ray.get(probe.options(scheduling_strategy=strategy).remote(), timeout=120)


def _replicas(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Stand-in records grouped into MoEDeployment replicas, DP ranks in order."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        groups[rec["gang_id"] or rec["replica"]].append(rec)
    return [sorted(g, key=lambda r: r["dp_rank"] or 0) for g in groups.values()]


@pytest.fixture(params=sorted(LAYOUTS), ids=lambda k: k)
def placed(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Plan, list[list[dict[str, Any]]], dict[str, Any], Any]]:
    import ray

    _, manifest = LAYOUTS[request.param]
    rs = _render(manifest, tmp_path)
    spec = MoEDeployment.model_validate(manifest).spec
    the_plan = plan(spec)
    head, workers = cluster_shape(rs, spec.resources.accelerator)
    env = {
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
        )
    }
    cluster = LocalCluster(workers, head=head, dashboard=True, env=env)
    cluster.start()
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        serve_config = yaml.safe_load(rs["spec"]["serveConfigV2"])
        app = serve_config["applications"][0]
        app["import_path"] = "standin_app:build_app"
        assert serve_config["proxy_location"] == "EveryNode"
        serve_config["proxy_location"] = "HeadOnly"
        serve_config["http_options"]["port"] = free_port()
        serve_config["grpc_options"]["port"] = free_port()
        assert cluster.dashboard_url is not None
        state = _deploy(cluster.dashboard_url, serve_config, cluster.auth_headers)
        yield the_plan, _replicas(_records()), state, cluster
    finally:
        ray.shutdown()
        cluster.stop()


def test_rendered_layout_is_placed_as_planned(
    placed: tuple[Plan, list[list[dict[str, Any]]], dict[str, Any], Any],
) -> None:
    the_plan, replicas, state, _cluster = placed
    expected = the_plan.initial_replicas
    assert len(replicas) == expected, f"{len(replicas)} replicas placed, {expected} planned"
    ranks_per_engine = the_plan.tensor_parallel_size * the_plan.pipeline_parallel_size
    used: set[tuple[str, int]] = set()
    rank_nodes: set[str] = set()
    lines = []
    for group in replicas:
        assert len(group) == the_plan.data_parallel_size
        where: dict[int, tuple[str, int]] = {}
        for rec in group:
            assert len(rec["bundles"]) == ranks_per_engine
            for i, bundle in enumerate(rec["bundles"]):
                node, gpus = _gpu_of(rec["pg_id"], bundle)
                assert len(gpus) == 1, gpus
                where[(rec["dp_rank"] or 0) * ranks_per_engine + i] = (node, gpus[0])
        assert sorted(where) == [p.rank for p in the_plan.placement]
        plan_node_to_ray: dict[int, str] = {}
        for p in the_plan.placement:
            node, gpu = where[p.rank]
            lines.append(
                f"rank {p.rank}: node {node[:8]} gpu {gpu} (plan node {p.node} gpu {p.local_rank})"
            )
            assert plan_node_to_ray.setdefault(p.node, node) == node, f"rank {p.rank} off its node"
            assert gpu == p.local_rank, f"rank {p.rank} got GPU {gpu}, plan says {p.local_rank}"
            assert (node, gpu) not in used, f"GPU {gpu} of {node} given twice"
            used.add((node, gpu))
        assert len(set(plan_node_to_ray.values())) == the_plan.nodes_per_replica
        rank_nodes |= set(plan_node_to_ray.values())
        if the_plan.data_parallel_size > 1:
            assert group[0]["dp_rank"] == 0
            assert all(r["master_node_id"] == where[0][0] for r in group), "rendezvous off rank 0"
    # Every node with ranks hosts a Serve replica, so Serve runs a proxy there.
    replica_nodes = {
        r["node_id"] for r in state["applications"]["moe"]["deployments"]["LLMEngine"]["replicas"]
    }
    assert rank_nodes <= replica_nodes
    print("\n" + "\n".join(lines))
