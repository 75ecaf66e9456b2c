"""gRPC for production clients, over a real socket to Ray Serve's gRPC proxy: the standard
`grpc.health.v1.Health` service (what Kubernetes gRPC probes, grpc_health_probe and meshes
call; protocol: grpc/grpc doc/health-checking.md), and the client service config's retries
honouring the server's `grpc-retry-pushback-ms` (gRFC A6; `tests/serving/test_grpc_retry.py`
has the same without Ray).

The engine deployment is a stand-in (no model: what is tested is the front end), inside the real
application (`moe_serving.app.build`: same ingress, same deployment options) on a real local
Ray cluster. The stand-in can be switched unhealthy.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe_serving import grpc_api
from moe_serving.config import AppConfig
from moe_serving.outcomes import RETRY_PUSHBACK_KEY
from moe_serving.proto import inference_pb2 as pb
from moe_serving.proto import inference_pb2_grpc as rpc
from moe_serving.protocol import Reason, Refusal, ResponseHead
from tests.support.ports import free_port

pytestmark = pytest.mark.engine


class SwitchableEngine:
    """Answers every request; its health can be switched, and it can refuse the next requests
    as the real replica does when its queue is full (`moe_serving.engine`)."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.healthy = True
        self.refusals = 0
        self.requests = 0

    def set_healthy(self, healthy: bool) -> None:
        self.healthy = healthy

    def refuse_next(self, n: int) -> None:
        self.refusals, self.requests = n, 0

    def requests_seen(self) -> int:
        return self.requests

    async def openai(
        self, kind: str, body: dict[str, Any], trace_headers: dict[str, str] | None = None
    ) -> AsyncIterator[Any]:
        self.requests += 1
        if self.refusals > 0:
            self.refusals -= 1
            for event in Refusal(503, Reason.QUEUE_FULL, "replica queue full", 1).events():
                yield event
            return
        yield ResponseHead(200, stream=False)
        yield {
            "id": "x",
            "object": "text_completion",
            "created": 0,
            "model": "tiny-moe",
            "choices": [{"index": 0, "text": "ok", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "tiny-moe", "object": "model"}]}

    async def health(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "message": "stand-in", "total": 0}

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {"waiting": 0.0, "running": 0.0}

    def metrics_text(self) -> dict[str, str]:
        return {"replica": "standin", "text": ""}


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, Any]]:
    import ray
    from ray import cloudpickle, serve

    from moe_serving.app import ENGINE_DEPLOYMENT, build
    from moe_serving.local import serve_options

    # Replicas import this module's stand-in by value (tests/ is not on their path).
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    config = AppConfig.model_validate(
        {"engine": {"model": "none", "served_model_name": "tiny-moe"}, "request_timeout_s": 60}
    )
    http_port, grpc_port = free_port(), free_port()
    ray.init(include_dashboard=False, log_to_driver=False, namespace="grpc-production")
    try:
        serve.start(**serve_options(http_port, grpc_port, host="127.0.0.1"))
        serve.run(build(config, SwitchableEngine), name="moe", route_prefix="/")
        yield f"127.0.0.1:{grpc_port}", serve.get_deployment_handle(ENGINE_DEPLOYMENT, "moe")
    finally:
        serve.shutdown()
        ray.shutdown()


def test_standard_health_service(served: tuple[str, Any]) -> None:
    target, engine = served
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        # "" is the server as a whole: what a Kubernetes gRPC probe asks (no metadata).
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == serving
        ours = health_pb2.HealthCheckRequest(service="moe.inference.v1.InferenceService")
        assert health.Check(ours, timeout=30).status == serving
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        listed = health.List(health_pb2.HealthListRequest(), timeout=30)
        assert {k: v.status for k, v in listed.statuses.items()} == {
            "": serving,
            "moe.inference.v1.InferenceService": serving,
        }
        # Watch: the status at once, then its change.
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=60)
        assert next(watch).status == serving
        engine.set_healthy.remote(False).result()
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        engine.set_healthy.remote(True).result()
        unknown = health.Watch(health_pb2.HealthCheckRequest(service="nope"), timeout=30)
        assert next(unknown).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        unknown.cancel()


def test_retry_pushback_through_serve_proxy(served: tuple[str, Any]) -> None:
    """A queue-full refusal reaches the client as RESOURCE_EXHAUSTED with the pushback trailer
    (Retry-After 1 s = 1000 ms), and the shipped client config retries it to success."""
    target, engine = served
    request = pb.CompleteRequest(prompt="hi", sampling=pb.SamplingParams(max_tokens=1))
    engine.refuse_next.remote(1).result()
    no_retries = grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)])
    with no_retries as channel, pytest.raises(grpc.RpcError) as err:
        rpc.InferenceServiceStub(channel).Complete(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (RETRY_PUSHBACK_KEY, "1000") in tuple(err.value.trailing_metadata() or ())
    assert engine.requests_seen.remote().result() == 1

    engine.refuse_next.remote(2).result()
    with grpc.insecure_channel(target, options=grpc_api.client_channel_options()) as channel:
        response = rpc.InferenceServiceStub(channel).Complete(request, timeout=60)
    assert response.choices[0].text == "ok"
    assert engine.requests_seen.remote().result() == 3  # two refusals retried by grpcio
