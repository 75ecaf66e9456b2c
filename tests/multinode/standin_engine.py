"""A stand-in for `moe_serving.replica.LLMEngine` that loads no model and records where its ranks
go.

Same constructor argument (the AppConfig), same DP-rank discovery (`moe_serving.dp_group`,
the code the real replica runs), same bundle choice as the real engine's Ray executor gets
(the gang's node-ordered slice with DP; the replica's own placement group, node-ordered with the
replica's node first, without). It publishes that record in the GCS's KV store under
`standin/<replica id>` for the test to read, and answers the ingress's calls minimally.

Kept free of `moe_serving.app` imports: Serve imports this module in every stand-in replica,
and a DeepSeek-sized layout starts 32 of them on a 2-core machine.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from moe_serving.protocol import ResponseHead

KV_PREFIX = "standin/"


class StandInEngine:
    async def __init__(self, config: Any) -> None:  # type: ignore[misc]
        import ray
        from ray import serve
        from ray.experimental.internal_kv import _internal_kv_put
        from ray.util import get_current_placement_group
        from ray.util.placement_group import placement_group_table

        from moe_serving import dp_group
        from moe_serving.config import AppConfig
        from moe_serving.vllm_args import ranks_per_engine

        self.config: AppConfig = config
        per_engine = ranks_per_engine(self.config.engine)
        ctx = ray.get_runtime_context()
        node_id = ctx.get_node_id()
        rank = await dp_group.discover(per_engine)
        pg = get_current_placement_group()
        assert pg is not None, "an engine replica always runs in a placement group"
        if rank is not None:
            bundles = list(rank.bundle_indices)
        else:
            table = placement_group_table(pg)["bundles_to_node_id"]
            nodes = {int(i): str(n) for i, n in table.items()}
            bundles = dp_group.bundles_by_node(nodes, node_id)[:per_engine]
        replica = str(serve.get_replica_context().replica_id.unique_id)
        self.record = {
            "replica": replica,
            "node_id": node_id,
            "pg_id": pg.id.hex(),
            "bundles": bundles,
            "dp_rank": None if rank is None else rank.rank,
            "dp_size": None if rank is None else rank.size,
            "gang_id": None if rank is None else rank.gang_id,
            "master_node_id": None if rank is None else rank.master_node_id,
        }
        _internal_kv_put(KV_PREFIX + replica, json.dumps(self.record).encode(), overwrite=True)

    async def openai(
        self, kind: str, body: dict[str, Any], trace_headers: dict[str, str] | None = None
    ) -> AsyncIterator[Any]:
        yield ResponseHead(200, stream=False)
        yield {"object": "text_completion", "choices": [{"text": json.dumps(self.record)}]}

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.config.engine.served_model_name}]}

    async def health(self) -> dict[str, Any]:
        return {"healthy": True, "message": "stand-in", "queued": 0, "in_engine": 0, "total": 0}

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {"waiting": 0.0, "running": 0.0}

    def metrics_text(self) -> dict[str, str]:
        return {"replica": self.record["replica"], "text": ""}
