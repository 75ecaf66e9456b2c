"""Data-parallel engine groups: one Serve replica per DP rank, gang-scheduled.

A replica of a MoEDeployment whose layout has attention data parallelism (DP > 1, the wide-EP
layout: e.g. DeepSeek-V3 as DP32 x EP32 over 4 nodes) is not one vLLM engine with
`data_parallel_size=N`: vLLM would then start all N engine cores on the node of the one Serve
replica, and every core's Ray executor would take the replica's first GPU bundle. Instead, as
Ray Serve LLM's `DPServer` does (ray/llm/_internal/serve/serving_patterns/data_parallel/), each
DP rank is its own Serve replica running a vLLM engine with `data_parallel_rank` set (vLLM's
"external load balancing" DP mode, vllm/engine/arg_utils.py), and the N replicas of one group
are one Serve *gang* (`gang_scheduling_config`, Ray Serve 2.60): placed together in one
placement group, started and restarted together (RESTART_GANG), since a DP group whose rank
died cannot step its MoE layers.

Rank 0 publishes the group's rendezvous address (its node IP and a free port) in the GCS's KV
store under the gang id; the other ranks wait for it. Each rank's engine ranks (TP x PP) use
its own slice of the gang's placement-group bundles, ordered by node with rank 0's node first,
so that tensor-parallel peers share a node and vLLM's global rank 0 runs where the advertised
address is.

This module needs Ray (in the replica) but not vLLM, so that a stand-in engine used by the
placement tests resolves its rank exactly as the real one does.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Prefix of the GCS KV keys holding each gang's rendezvous address.
_KEY_PREFIX = "moe_serving/dp_master/"
#: How long ranks > 0 wait for rank 0 to publish (rank 0 starts with them: seconds, normally).
MASTER_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class DPRank:
    """Where one DP rank of a gang stands."""

    rank: int
    size: int
    gang_id: str
    master_address: str
    master_port: int
    master_node_id: str
    placement_group_name: str
    bundle_indices: tuple[int, ...]  # this rank's bundles in the gang's placement group

    def engine_args(self) -> dict[str, Any]:
        """vLLM engine arguments that make this engine rank `rank` of the DP group."""
        return {
            "data_parallel_rank": self.rank,
            "data_parallel_address": self.master_address,
            "data_parallel_rpc_port": self.master_port,
        }

    def env(self) -> dict[str, str]:
        """Environment for vLLM's Ray executor: which bundles its ranks take."""
        return {"VLLM_RAY_BUNDLE_INDICES": ",".join(str(i) for i in self.bundle_indices)}


def bundles_by_node(bundle_nodes: Mapping[int, str], first_node: str) -> list[int]:
    """Bundle indices with those of one node adjacent, `first_node`'s first, then by node id
    (pure). Adjacent indices of a placement group may sit on different nodes: without this,
    one DP rank's tensor-parallel bundles could span nodes."""
    per_node: dict[str, list[int]] = defaultdict(list)
    for index in sorted(bundle_nodes):
        per_node[bundle_nodes[index]].append(index)
    ordered = per_node.pop(first_node, [])
    for node in sorted(per_node):
        ordered += per_node[node]
    return ordered


def rank_bundles(rank: int, per_rank: int, ordered: list[int]) -> tuple[int, ...]:
    """The `per_rank` bundles DP rank `rank` owns, from the node-ordered list (pure)."""
    if len(ordered) < (rank + 1) * per_rank:
        raise ValueError(
            f"gang placement group has {len(ordered)} bundles; rank {rank} needs "
            f"{per_rank} from index {rank * per_rank}"
        )
    return tuple(ordered[rank * per_rank : (rank + 1) * per_rank])


def _key(gang_id: str) -> bytes:
    return (_KEY_PREFIX + gang_id).encode()


async def _master(gang_id: str, timeout_s: float) -> tuple[str, int, str]:
    from ray.experimental.internal_kv import _internal_kv_get

    deadline = time.monotonic() + timeout_s
    while True:
        raw = _internal_kv_get(_key(gang_id))
        if raw is not None:
            info = json.loads(raw)
            return str(info["address"]), int(info["port"]), str(info["node_id"])
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"DP rank 0 of gang {gang_id} did not publish its address in {timeout_s:.0f}s"
            )
        await asyncio.sleep(0.5)


async def discover(ranks_per_dp_rank: int, timeout_s: float = MASTER_TIMEOUT_S) -> DPRank | None:
    """This Serve replica's DP rank, or None when it is not part of a gang (DP = 1)."""
    import ray
    from ray import serve
    from ray.experimental.internal_kv import _internal_kv_put
    from ray.util.collective.collective import get_address_and_port
    from ray.util.placement_group import get_placement_group, placement_group_table

    gang = serve.get_replica_context().gang_context
    if gang is None:
        return None
    if gang.rank == 0:
        address, port = get_address_and_port()
        node_id = ray.get_runtime_context().get_node_id()
        value = json.dumps({"address": address, "port": port, "node_id": node_id})
        _internal_kv_put(_key(gang.gang_id), value.encode(), overwrite=True)
    else:
        address, port, node_id = await _master(gang.gang_id, timeout_s)
    table = placement_group_table(get_placement_group(gang.pg_name))
    bundle_nodes = {int(i): str(n) for i, n in table["bundles_to_node_id"].items()}
    ordered = bundles_by_node(bundle_nodes, node_id)
    return DPRank(
        rank=int(gang.rank),
        size=int(gang.world_size),
        gang_id=str(gang.gang_id),
        master_address=str(address),
        master_port=int(port),
        master_node_id=node_id,
        placement_group_name=str(gang.pg_name),
        bundle_indices=rank_bundles(int(gang.rank), ranks_per_dp_rank, ordered),
    )


def forget(rank: DPRank | None) -> None:
    """Rank 0 removes its gang's address when it stops (a new gang gets a new id)."""
    if rank is None or rank.rank != 0:
        return
    try:
        from ray.experimental.internal_kv import _internal_kv_del

        _internal_kv_del(_key(rank.gang_id))
    except Exception:  # GCS already gone (cluster stopping): nothing to clean
        pass
