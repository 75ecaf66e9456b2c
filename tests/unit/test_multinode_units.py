"""Pure parts of multi-node replicas: Ray's accelerator names, DP-rank bundle choice, gang
replica counts, and ready replicas from the live state (no Ray cluster, no engine)."""

from __future__ import annotations

import pytest

from moe_operator.catalog import ACCELERATORS
from moe_operator.live import LiveStatus
from moe_operator.status import Inputs, compute
from moe_serving.dp_group import bundles_by_node, rank_bundles
from moe_serving.live_state import none_can_serve, replica_counts

GPUS = [name for name, acc in ACCELERATORS.items() if acc.k8s_resource]


@pytest.mark.parametrize("name", GPUS)
def test_ray_accelerator_type_is_what_ray_autodetects(name: str) -> None:
    """The bundle resource must be the one Ray puts on a node with that GPU: its autodetection
    (ray/_private/accelerators/nvidia_gpu.py) maps the NVML name to e.g. "A100", and the sized
    names ("A100-80G") are never added to nodes (ray/util/accelerators/accelerators.py). A
    bundle asking for `accelerator_type:A100-80G` waits forever."""
    from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager
    from ray.util.accelerators import accelerators

    acc = ACCELERATORS[name]
    detected = NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type(acc.nvml_name)
    assert detected == acc.ray_accelerator_type
    sized = {accelerators.NVIDIA_A100_40G, accelerators.NVIDIA_A100_80G}
    assert acc.ray_accelerator_type not in sized


def test_rendered_bundles_ask_for_the_autodetected_type() -> None:
    from pathlib import Path

    import yaml

    from moe_operator.api import MoEDeployment
    from moe_operator.planner import plan
    from moe_operator.render import app_config

    root = Path(__file__).resolve().parents[2]
    for example in ("deepseek-v3-4x8xa100-80gb", "mixtral-8x7b-2xa100-40gb"):
        dep = MoEDeployment.model_validate(
            yaml.safe_load((root / f"manifests/examples/{example}.yaml").read_text())
        )
        config = app_config("x", dep.spec, plan(dep.spec))
        assert config.resources.accelerator_type == "A100"


def test_bundles_by_node_keeps_one_nodes_bundles_together_master_first() -> None:
    # Gang placement groups interleave nodes (dp_server.py's example: N0 N1 N0 N1).
    nodes = {0: "b", 1: "a", 2: "b", 3: "a", 4: "c", 5: "c"}
    assert bundles_by_node(nodes, "b") == [0, 2, 1, 3, 4, 5]
    assert bundles_by_node(nodes, "zzz") == [1, 3, 0, 2, 4, 5]
    ordered = bundles_by_node(nodes, "b")
    assert [rank_bundles(r, 2, ordered) for r in range(3)] == [(0, 2), (1, 3), (4, 5)]
    with pytest.raises(ValueError, match="rank 3 needs 2"):
        rank_bundles(3, 2, ordered)


def _details(states: list[str], target: int, status: str = "HEALTHY") -> dict[str, object]:
    replicas = [{"state": s} for s in states]
    deps = {"LLMEngine": {"replicas": replicas, "target_num_replicas": target, "status": status}}
    return {"applications": {"moe": {"deployments": deps}}}


def test_replica_counts_are_whole_dp_groups() -> None:
    details = _details(["RUNNING"] * 5 + ["STARTING"] * 3, 8)
    assert replica_counts(details, "moe", "LLMEngine") == (5, 8)
    assert replica_counts(details, "moe", "LLMEngine", gang_size=4) == (1, 2)


def _rs(ready_workers: int) -> dict[str, object]:
    return {
        "metadata": {"generation": 1},
        "status": {
            "observedGeneration": 1,
            "conditions": [{"type": "Ready", "status": "True"}],
            "activeServiceStatus": {
                "rayClusterStatus": {
                    "readyWorkerReplicas": ready_workers,
                    "availableWorkerReplicas": 4,
                }
            },
        },
    }


def test_ready_replicas_come_from_the_serve_app_when_known() -> None:
    """A multi-host slice's workers may stay NotReady under KubeRay's worker probe (it checks a
    Serve proxy, which runs only on nodes hosting a Serve replica: ray/serve/_private/
    controller.py `_update_proxy_nodes`), so pod readiness undercounts: the serving app's own
    count of running replicas wins when the operator has read it."""
    live = LiveStatus(
        queue_depth=0,
        desired_replicas=1,
        serving_replicas=1,
        output_tokens_per_second=None,
        cost_per_million_tokens=None,
    )
    base = {"name": "d", "generation": 1, "now": "2026-01-01T00:00:00Z", "nodes_per_replica": 4}
    without = compute(Inputs(**base, ray_service=_rs(1)))  # type: ignore[arg-type]
    assert without["readyReplicas"] == 0  # 1 ready pod of a 4-pod slice
    with_live = compute(Inputs(**base, ray_service=_rs(1), live=live))  # type: ignore[arg-type]
    assert with_live["readyReplicas"] == 1
    ready = next(c for c in with_live["conditions"] if c["type"] == "Ready")
    assert "1 replica(s) ready" in ready["message"]


def test_requests_are_refused_only_when_no_replica_can_come_soon() -> None:
    """Refuse (503 at once) only when nothing runs and Serve calls the deployment UNHEALTHY (a
    lost node: the gang waits for placement); while replicas start in a rolling change
    (UPDATING) or from zero (UPSCALING) requests wait for them. Statuses: Serve's
    DeploymentStatus (ray/serve/_private/common.py)."""
    assert none_can_serve(_details(["STARTING", "STARTING"], 2, "UNHEALTHY"), "moe", "LLMEngine", 2)
    assert not none_can_serve(_details(["STARTING"], 1, "UPDATING"), "moe", "LLMEngine")
    assert not none_can_serve(_details(["STARTING"], 1, "UPSCALING"), "moe", "LLMEngine")
    assert not none_can_serve(_details(["RUNNING"], 1, "UNHEALTHY"), "moe", "LLMEngine")
    # What the controller really hands back: Serve's enum members, not plain strings.
    from ray.serve._private.common import DeploymentStatus, ReplicaState

    real = _details([ReplicaState.STARTING], 1, DeploymentStatus.UNHEALTHY)  # type: ignore[list-item]
    assert none_can_serve(real, "moe", "LLMEngine")
    # One rank of a 2-rank gang running is no whole replica.
    assert none_can_serve(_details(["RUNNING"], 2, "UNHEALTHY"), "moe", "LLMEngine", 2)
