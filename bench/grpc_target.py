"""The load generator's adapter for our gRPC API (`moe.inference.v1.InferenceService`).

Non-streaming requests call `Complete`; streaming ones call `Generate` with a completion input.
Sampling matches the HTTP benchmark: greedy, `max_tokens`, `ignore_eos`. Ray Serve's gRPC proxy
routes on the `application` metadata key, so every call carries the application's name.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from moe_serving.proto import inference_pb2 as pb
from moe_serving.proto import inference_pb2_grpc as pb_grpc

from .loadgen import GrpcChunk


def stub_factory(channel: Any) -> Any:
    return pb_grpc.InferenceServiceStub(channel)


class InferenceAdapter:
    """Maps a workload request onto `Complete` / `Generate`."""

    def __init__(self, model: str, application: str | None = None, api_key: str | None = None):
        self.model = model
        metadata: list[tuple[str, str]] = []
        if application:
            metadata.append(("application", application))
        if api_key:
            metadata.append(("x-api-key", api_key))
        self.metadata = tuple(metadata)

    def _request(self, prompt: str, max_tokens: int) -> Any:
        return pb.CompleteRequest(
            model=self.model,
            prompt=prompt,
            sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
        )

    async def unary(self, stub: Any, prompt: str, max_tokens: int) -> GrpcChunk:
        reply = await stub.Complete(self._request(prompt, max_tokens), metadata=self.metadata)
        tokens = reply.usage.completion_tokens if reply.HasField("usage") else None
        return GrpcChunk(
            tokens=tokens if tokens is not None else sum(len(c.token_ids) for c in reply.choices),
            completion_tokens=tokens,
            prompt_tokens=reply.usage.prompt_tokens if reply.HasField("usage") else None,
        )

    async def streaming(self, stub: Any, prompt: str, max_tokens: int) -> AsyncIterator[GrpcChunk]:
        request = pb.GenerateRequest(completion=self._request(prompt, max_tokens))
        async for chunk in stub.Generate(request, metadata=self.metadata):
            usage = chunk.usage if chunk.HasField("usage") else None
            yield GrpcChunk(
                # A delta carries its token ids when asked, else count one token per text delta.
                tokens=len(chunk.token_ids) or (1 if chunk.text else 0),
                completion_tokens=usage.completion_tokens if usage is not None else None,
                prompt_tokens=usage.prompt_tokens if usage is not None else None,
            )
