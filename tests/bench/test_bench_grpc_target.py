"""The moe.inference.v1 adapter against a stand-in servicer built from the real generated stubs.

The servicer is a fake (no engine may run here): it answers `Complete` and `Generate` the way
the proto documents (deltas, then a final chunk with usage) and records what it was sent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

pytest.importorskip(
    "moe_serving.proto.inference_pb2_grpc",
    reason="moe_serving's generated gRPC stubs are missing (run `make proto`)",
)

from bench.grpc_target import InferenceAdapter, stub_factory
from bench.loadgen import GrpcClient, Workload, run_load
from moe_serving.proto import inference_pb2 as pb
from moe_serving.proto import inference_pb2_grpc as pb_grpc


class FakeInference(pb_grpc.InferenceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.metadata: list[dict[str, str]] = []

    def _record(self, request: Any, context: grpc.aio.ServicerContext) -> int:
        self.requests.append(request)
        self.metadata.append({k: v for k, v in context.invocation_metadata()})
        sampling = request.sampling
        return sampling.max_tokens if sampling.ignore_eos else 2

    async def Complete(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        n = self._record(request, context)
        return pb.CompleteResponse(
            choices=[pb.Choice(text="x" * n, finish_reason="length")],
            usage=pb.Usage(prompt_tokens=len(request.prompt.split()), completion_tokens=n),
        )

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        n = self._record(request.completion, context)
        for i in range(n):
            yield pb.GenerateChunk(text=f"t{i}")
        yield pb.GenerateChunk(finish_reason="length", usage=pb.Usage(completion_tokens=n))


@pytest.mark.parametrize("stream", [True, False])
async def test_adapter_drives_complete_and_generate(stream: bool) -> None:
    servicer = FakeInference()
    server = grpc.aio.server()
    pb_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        adapter = InferenceAdapter("tiny-moe", application="bench")
        w = Workload(concurrency=2, max_requests=6, max_seconds=60, max_tokens=5, stream=stream)
        async with GrpcClient(f"127.0.0.1:{port}", stub_factory, adapter) as client:
            res = await run_load(client.sender(w), w)
    finally:
        await server.stop(None)
    s = res.summary()
    assert (s.ok, s.failed) == (6, 0)
    assert (s.output_tokens_min, s.output_tokens_max) == (5, 5)
    assert s.token_sources == ["usage"]
    assert len(servicer.requests) == 6
    for request in servicer.requests:
        assert request.model == "tiny-moe"
        assert request.sampling.max_tokens == 5 and request.sampling.ignore_eos
        assert request.sampling.HasField("temperature") and request.sampling.temperature == 0.0
    assert all(m.get("application") == "bench" for m in servicer.metadata)
    if stream:
        assert all(r.ttft_s is not None for r in res.results)
