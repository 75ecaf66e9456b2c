"""The Ray nodes a rendered RayService turns into, as KubeRay starts them.

KubeRay builds each pod's `ray start` from the group's `rayStartParams` and the Ray container's
resource limits (ray-operator/controllers/ray/common/pod.go, `generateRayStartCommand`:
`--num-cpus` from limits.cpu, `--num-gpus` from limits["nvidia.com/gpu"], `--memory` from
limits.memory, unless rayStartParams set them). A GPU node's `accelerator_type:<name>` resource
is then added by Ray's own autodetection from the NVML device name
(ray/_private/accelerators/nvidia_gpu.py): here it comes from the catalog's NVML name run
through that very function, so no name is typed twice.
"""

from __future__ import annotations

from typing import Any

from moe_operator.catalog import ACCELERATORS
from moe_operator.quantity import parse_quantity
from moe_serving.local_cluster import NodeShape


def ray_autodetected_type(accelerator: str) -> str | None:
    """The accelerator_type Ray's autodetection gives a node with this catalog GPU."""
    from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager

    name = ACCELERATORS[accelerator].nvml_name
    return NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type(name) if name else None


def _shape(group: dict[str, Any], accelerator: str | None) -> NodeShape:
    params = group.get("rayStartParams") or {}
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpus = float(params.get("num-cpus", parse_quantity(limits["cpu"])))
    gpus = int(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    memory = int(parse_quantity(limits["memory"]))
    return NodeShape(
        num_cpus=cpus,
        num_gpus=gpus,
        accelerator_type=ray_autodetected_type(accelerator) if gpus and accelerator else None,
        memory_bytes=memory,
    )


def cluster_shape(
    ray_service: dict[str, Any], accelerator: str
) -> tuple[NodeShape, list[NodeShape]]:
    """(head, workers) for the RayService's initial size: every worker group's `replicas`
    slices of `numOfHosts` pods."""
    cluster = ray_service["spec"]["rayClusterConfig"]
    head = _shape(cluster["headGroupSpec"], None)
    workers: list[NodeShape] = []
    for group in cluster["workerGroupSpecs"]:
        pods = int(group.get("replicas", 1)) * int(group.get("numOfHosts", 1))
        workers += [_shape(group, accelerator)] * pods
    return head, workers
