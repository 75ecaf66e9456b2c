"""gRPC for production clients, over a real socket to Ray Serve's gRPC proxy: the standard
`grpc.health.v1.Health` service (what Kubernetes gRPC probes, grpc_health_probe and meshes
call; protocol: grpc/grpc doc/health-checking.md) and the documented client service config
(README "gRPC clients": retries of UNAVAILABLE / RESOURCE_EXHAUSTED honouring the server's
`grpc-retry-pushback-ms`, grpc/proposal A6-client-retries.md) exercised with grpcio's own retry
support.

The engine deployment is a stand-in (no model: what is tested is the front end), inside the real
application (`moe_serving.app.build`: same ingress, same deployment options) on a real local
Ray cluster. The stand-in refuses its first requests as a full replica does (503 queue_full
with a retry hint) and can be switched unhealthy.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe_serving.config import AppConfig
from moe_serving.proto import inference_pb2 as pb
from moe_serving.proto import inference_pb2_grpc as rpc

pytestmark = pytest.mark.engine

#: The service config README documents for clients (kept in one place: the test uses it as is).
SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [{"service": "moe.inference.v1.InferenceService"}],
            "timeout": "120s",
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.5s",
                "maxBackoff": "10s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
            },
        }
    ]
}


class FlakyEngine:
    """Refuses the first `refusals` requests (503 queue_full, retry in 1 s), then answers."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = AppConfig.model_validate(config)
        self.refusals = 0
        self.calls = 0
        self.healthy = True

    def arm(self, refusals: int) -> None:
        self.refusals, self.calls = refusals, 0

    def set_healthy(self, healthy: bool) -> None:
        self.healthy = healthy

    def seen(self) -> int:
        return self.calls

    async def openai(
        self, kind: str, body: dict[str, Any], trace_headers: dict[str, str] | None = None
    ) -> AsyncIterator[Any]:
        self.calls += 1
        if self.calls <= self.refusals:
            yield {"status": 503, "stream": False, "reason": "queue_full", "retry_after_s": 1}
            yield {"error": {"message": "server busy", "type": "Error", "code": 503}}
            return
        yield {"status": 200, "stream": False, "reason": "ok", "retry_after_s": None}
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
    import cloudpickle
    import ray
    from ray import serve

    from moe_serving.app import ENGINE_DEPLOYMENT, build
    from moe_serving.local import serve_options
    from moe_serving.local_cluster import _free_port

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    config = AppConfig.model_validate(
        {"engine": {"model": "none", "served_model_name": "tiny-moe"}, "request_timeout_s": 60}
    )
    http_port, grpc_port = _free_port(), _free_port()
    ray.init(include_dashboard=False, log_to_driver=False, namespace="grpc-production")
    try:
        serve.start(**serve_options(http_port, grpc_port, host="127.0.0.1"))
        serve.run(build(config, FlakyEngine), name="moe", route_prefix="/")
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


def test_client_retry_config_rides_out_refusals(served: tuple[str, Any]) -> None:
    target, engine = served
    request = pb.CompleteRequest(model="tiny-moe", prompt="x")
    engine.arm.remote(2).result()
    # Without a retry policy the refusal reaches the client, with the server's retry hint.
    with grpc.insecure_channel(target) as plain:
        with pytest.raises(grpc.RpcError) as err:
            rpc.InferenceServiceStub(plain).Complete(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(err.value.trailing_metadata() or ())
        assert trailers.get("grpc-retry-pushback-ms") == "1000"
    engine.arm.remote(2).result()
    options = [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(SERVICE_CONFIG))]
    with grpc.insecure_channel(target, options=options) as channel:
        started = time.monotonic()
        reply = rpc.InferenceServiceStub(channel).Complete(request)
        waited = time.monotonic() - started
    assert reply.choices[0].text == "ok"
    assert engine.seen.remote().result() == 3  # two refusals retried by grpcio, then served
    # The two retries waited the server's pushback (1 s each), not the 0.5 s initial backoff.
    assert waited >= 2.0
