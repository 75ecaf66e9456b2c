"""Translates the operator's `EngineArgs` into vLLM's own argument namespace and environment.

vLLM's OpenAI layer is initialised from the same `argparse.Namespace` its CLI server builds, so
we start from the CLI parser's defaults and set our fields on it: every vLLM default stays
vLLM's, and `extra` can carry any other engine or frontend argument the CLI knows.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from moe_serving.config import EngineArgs


class EngineArgsError(ValueError):
    """The engine arguments cannot be turned into a vLLM configuration."""


def world_size(engine: EngineArgs) -> int:
    """Engine ranks (processes) of one MoEDeployment replica: TP x PP x DP."""
    return engine.tensor_parallel_size * engine.pipeline_parallel_size * engine.data_parallel_size


def ranks_per_engine(engine: EngineArgs) -> int:
    """Ranks one vLLM engine (one Serve replica) runs: TP x PP. With DP > 1 there is one
    engine per DP rank (`moe_serving.dp_group`)."""
    return engine.tensor_parallel_size * engine.pipeline_parallel_size


def engine_kwargs(engine: EngineArgs) -> dict[str, Any]:
    """vLLM `AsyncEngineArgs` keyword arguments for `engine` (None values left to vLLM)."""
    kwargs: dict[str, Any] = {
        "model": engine.model,
        "served_model_name": [engine.served_model_name],
        "revision": engine.revision,
        "dtype": engine.dtype,
        "max_model_len": engine.max_model_len,
        "quantization": engine.quantization,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "data_parallel_size": engine.data_parallel_size,
        "pipeline_parallel_size": engine.pipeline_parallel_size,
        "enable_expert_parallel": engine.enable_expert_parallel,
        "enforce_eager": engine.enforce_eager,
        # One node by default: ranks as local processes. Multi-node layouts say "ray".
        "distributed_executor_backend": engine.distributed_executor_backend or "mp",
        "all2all_backend": engine.all2all_backend,
    }
    if engine.eplb.enabled:
        kwargs["enable_eplb"] = True
        kwargs["eplb_config"] = {
            "num_redundant_experts": engine.eplb.num_redundant_experts,
            "window_size": engine.eplb.window_size,
            "step_interval": engine.eplb.step_interval,
        }
    kwargs.update(engine.extra)
    return {key: value for key, value in kwargs.items() if value is not None}


def build_namespace(engine: EngineArgs) -> argparse.Namespace:
    """The namespace vLLM's `vllm serve` would build for these arguments."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args([])
    for key, value in engine_kwargs(engine).items():
        if not hasattr(args, key):
            raise EngineArgsError(
                f"engine.extra: {key!r} is not a vLLM engine or server argument "
                "(use the names of `vllm serve --help`, with underscores)"
            )
        setattr(args, key, value)
    if engine.tool_call_parser:
        from moe_serving.tool_choice import constrained_parser

        # Same parser, but required/named tool choice always constrained (tool_choice.py).
        args.tool_call_parser = constrained_parser(engine.tool_call_parser)
        args.enable_auto_tool_choice = True
    if engine.reasoning_parser:
        args.reasoning_parser = engine.reasoning_parser
        args.structured_outputs_config.reasoning_parser = engine.reasoning_parser
    return args


def cpu_thread_binding(ranks: int, cpus: list[int]) -> str:
    """`VLLM_CPU_OMP_THREADS_BIND` giving each rank its own equal share of `cpus`.

    vLLM's automatic binding wants one NUMA node per rank and fails on a single-node machine
    ("Not enough allowed NUMA nodes to bind threads"); explicit core lists work.
    """
    if ranks < 1 or len(cpus) < ranks:
        raise EngineArgsError(f"{ranks} engine ranks need at least {ranks} CPUs, have {len(cpus)}")
    share = len(cpus) // ranks
    groups = [sorted(cpus)[r * share : (r + 1) * share] for r in range(ranks)]
    return "|".join(",".join(str(c) for c in group) for group in groups)


def dp_cpu_binding(engine: EngineArgs, dp_rank: int) -> str | None:
    """On a CPU build, the cores DP rank `dp_rank` binds its single engine rank to: its own
    share of this machine's cores (ranks of a local multi-node cluster share one machine), so
    the DP ranks do not compete for one core. None where nothing needs binding."""
    if ranks_per_engine(engine) != 1 or engine.data_parallel_size < 2:
        return None
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    cpus = sorted(os.sched_getaffinity(0))
    groups = cpu_thread_binding(min(engine.data_parallel_size, len(cpus)), cpus).split("|")
    return groups[dp_rank % len(groups)]


def cpu_env_defaults(engine: EngineArgs) -> dict[str, str]:
    """Environment vLLM's CPU backend needs, for variables not set already (CPU builds only)."""
    env: dict[str, str] = {}
    if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB; vLLM's default reserves far more
    ranks = engine.tensor_parallel_size * engine.pipeline_parallel_size
    if ranks > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(
            ranks, sorted(os.sched_getaffinity(0))
        )
    return env
