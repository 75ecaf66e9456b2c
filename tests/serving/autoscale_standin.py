"""A cheap stand-in for the engine deployment, for autoscaling tests with many replicas.

Same contract as `moe_serving.replica.LLMEngine` as far as autoscaling goes: the same admission
queue (`max_ongoing` run at once, the rest wait on the replica), the same
`record_autoscaling_stats` (through `moe_serving.autoscaling.replica_stats`) and the same
replica-count options. No vLLM: a request holds a running slot for `hold_s` seconds, and the
replica takes no CPU, so several fit on this 2-core machine.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

from moe_serving import autoscaling
from moe_serving.admission import AdmissionQueue
from moe_serving.config import AutoscalingArgs

DEPLOYMENT = "LLMEngine"


class StandInEngine:
    def __init__(self, max_ongoing: int) -> None:
        self.admission = AdmissionQueue(max_ongoing, max_queued=10_000)

    async def work(self, hold_s: float) -> str:
        async with self.admission.slot():
            await asyncio.sleep(hold_s)
        return serve.get_replica_context().replica_id.unique_id

    def record_autoscaling_stats(self) -> dict[str, float]:
        running = self.admission.running
        return autoscaling.replica_stats(
            {"queued": self.admission.waiting, "in_engine": running, "scheduler_waiting": 0}
        )


def build(args: AutoscalingArgs, max_ongoing: int) -> Any:
    """The stand-in app, with the engine deployment's replica-count options."""
    return serve.deployment(
        name=DEPLOYMENT,
        ray_actor_options={"num_cpus": 0},
        # As for the engine: requests are delivered to the replica's own admission queue.
        max_ongoing_requests=max_ongoing + 10_000 + 16,
        **autoscaling.replica_count_options(args, max_ongoing),
    )(StandInEngine).bind(max_ongoing)
