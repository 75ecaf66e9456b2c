"""The engine deployment: one Ray Serve replica holding one vLLM engine (`EngineServer`) and
its ranks, answering the ingress's calls (`openai` streams `moe_serving.protocol` events).

With DP > 1 the replica is one rank of a data-parallel gang (`moe_serving.dp_group`) and its
config is completed with that rank (`with_dp_rank`). Every few seconds it reports its load and
metrics to the application's board (`moe_serving.live_state`), where the ingress reads them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from moe_serving import autoscaling, dp_group, live_state
from moe_serving.config import AppConfig
from moe_serving.engine import EngineServer
from moe_serving.protocol import Event, Kind
from moe_serving.vllm_args import dp_cpu_binding, ranks_per_engine

logger = logging.getLogger("ray.serve.moe_serving")


def with_dp_rank(config: AppConfig, rank: dp_group.DPRank) -> AppConfig:
    """The replica's config once it knows its DP rank: vLLM's rank arguments, the bundles its
    Ray executor takes, and (on the CPU) the core its engine binds to."""
    engine = config.engine
    env = {**engine.env, **rank.env()}
    binding = dp_cpu_binding(engine, rank.rank)
    if binding is not None:
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", binding)
    engine = engine.model_copy(update={"extra": {**engine.extra, **rank.engine_args()}, "env": env})
    return config.model_copy(update={"engine": engine})


class LLMEngine:
    """Ray Serve deployment holding one vLLM engine (one replica = one engine + its ranks)."""

    async def __init__(self, config: AppConfig) -> None:  # type: ignore[misc]
        # Ray Serve awaits an async constructor: the replica is ready once vLLM is.
        self.config = config
        self.dp_rank = await dp_group.discover(ranks_per_engine(self.config.engine))
        if self.dp_rank is not None:
            self.config = with_dp_rank(self.config, self.dp_rank)
            logger.info(
                "DP rank %d/%d of gang %s (rendezvous %s:%d, bundles %s)",
                self.dp_rank.rank,
                self.dp_rank.size,
                self.dp_rank.gang_id,
                self.dp_rank.master_address,
                self.dp_rank.master_port,
                self.dp_rank.bundle_indices,
            )
        self.server = EngineServer(self.config)
        await self.server.start()
        self._live_task = asyncio.get_running_loop().create_task(self._report_live_state())

    async def _report_live_state(self) -> None:
        """Push this replica's load to the application's board every few seconds (the
        operator reads the sum through the ingress's GET /v1/moe/state)."""
        import ray

        ctx = serve.get_replica_context()
        replica = str(ctx.replica_id.unique_id)
        node = ray.util.get_node_ip_address()
        dp_rank = self.dp_rank.rank if self.dp_rank is not None else None
        # The ranks of one engine: a DP group's replicas are one engine for expert imbalance.
        group = self.dp_rank.gang_id if self.dp_rank is not None else replica
        board = None
        while True:
            try:
                if board is None:
                    board = live_state.board(ctx.app_name)
                await board.put.remote(self.server.live_report(replica, node, dp_rank, group))
                # For the ingress's /metrics: every replica's series, not only the answering one's.
                await board.put_metrics.remote(replica, self.server.metrics_text())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the board actor died: make a new one next time
                logger.debug("live-state report failed: %s", exc)
                board = None
            await asyncio.sleep(live_state.REPORT_INTERVAL_S)

    async def openai(
        self, kind: Kind, body: dict[str, Any], trace_headers: dict[str, str] | None = None
    ) -> AsyncIterator[Event]:
        """Stream of engine events for one OpenAI request (`moe_serving.protocol`)."""
        async for event in self.server.openai(kind, body, trace_headers):
            yield event

    async def models(self) -> dict[str, Any]:
        return await self.server.models()

    async def health(self) -> dict[str, Any]:
        """Liveness of the engine core plus the current load (used by /health and gRPC Health)."""
        try:
            await self.server.check_health()
        except Exception as exc:
            return {"healthy": False, "message": str(exc), **self.server.queue_depth().as_dict()}
        return {"healthy": True, "message": "ok", **self.server.queue_depth().as_dict()}

    async def check_health(self) -> None:
        """Ray Serve's periodic health check: raising marks the replica unhealthy (restarted)."""
        await self.server.check_health()

    def queue_depth(self) -> dict[str, int]:
        """Queued (ours) + waiting and running (vLLM) requests: the autoscaling signal."""
        return self.server.queue_depth().as_dict()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's custom-metrics hook: waiting/running requests for the autoscaling policy."""
        return autoscaling.replica_stats(self.server.queue_depth().as_dict())

    def metrics_text(self) -> dict[str, str]:
        """This replica's Prometheus text and its Serve replica id (the label it gets)."""
        replica = str(serve.get_replica_context().replica_id.unique_id)
        return {"replica": replica, "text": self.server.metrics_text()}

    def __del__(self) -> None:
        # Ray Serve calls this after draining in-flight requests (graceful_shutdown_* options).
        dp_group.forget(getattr(self, "dp_rank", None))
        task = getattr(self, "_live_task", None)
        if task is not None:
            task.cancel()
        server = getattr(self, "server", None)
        if server is not None:
            server.shutdown()
