"""Registers `moe.inference.v1.InferenceService` and the standard `grpc.health.v1.Health`
service with Ray Serve's gRPC proxy (the functions named in `grpc_servicer_functions`).

`grpc.health.v1.Health` (Check and Watch, grpc/grpc doc/health-checking.md) is what
Kubernetes' gRPC probes, `grpc_health_probe` and service meshes call; the proxy routes its
methods to the ingress's `Check` / `Watch` like our own RPCs.

Unlike the generated `add_InferenceServiceServicer_to_server`, requests are not parsed in the
proxy: the proxy forwards the raw bytes, and the ingress parses them (`decode`). A message that
is not valid protobuf then gets INVALID_ARGUMENT from our code instead of the UNKNOWN
("DecodeError") the proxy answers when its own deserializer fails. Responses are serialized as
usual.

Under Ray Serve's proxy a unary error ends as a Trailers-Only response (`_under_serve_proxy`),
so that clients with a retry policy can retry it and honour the server's retry pushback.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from moe_serving.proto import inference_pb2 as pb

SERVICE = "moe.inference.v1.InferenceService"
HEALTH_SERVICE = "grpc.health.v1.Health"

M = TypeVar("M", bound=Message)


class UndecodableRequest(ValueError):
    """The request bytes are not a valid message of the method's request type."""


def decode(request: Any, cls: type[M]) -> M:
    """The request as a `cls` message: bytes from the proxy are parsed here."""
    if isinstance(request, cls):
        return request
    if not isinstance(request, bytes | bytearray | memoryview):
        raise UndecodableRequest(f"expected a {cls.DESCRIPTOR.full_name} message")
    try:
        return cls.FromString(bytes(request))
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise UndecodableRequest(
            f"request is not a valid {cls.DESCRIPTOR.full_name} protobuf message ({exc})"
        ) from exc


def _trailers_only(handler: Callable[[Any, Any], Awaitable[Any]]) -> Any:
    """A unary handler of Serve's proxy that ends a call with a non-OK code by `abort`.

    Serve's proxy answers an error by setting the code (and the deployment's trailing metadata)
    on the call and *returning* an empty message. grpcio's aio server then sends response
    headers before the status, which commits the call: gRFC A6 ("When Retries are Valid") lets
    a client retry only when the error comes as Trailers-Only, which `abort` sends (with the
    trailing metadata already set, e.g. `grpc-retry-pushback-ms`). Seen with grpcio 1.85: the
    returned-message form was not retried, the aborted one was.
    """

    async def unary(request: Any, context: Any) -> Any:
        response = await handler(request, context)
        code = context.code()
        if code is not None and code != grpc.StatusCode.OK and code != 0:
            await context.abort(code, context.details() or "")
        return response

    return unary


def _under_serve_proxy(server: Any, service: str, handlers: dict[str, Any]) -> dict[str, Any]:
    """`handlers` as Ray Serve's gRPC proxy would route them, with `_trailers_only` around the
    unary ones; the service is marked as passthrough so that the proxy keeps them. Other servers
    (or a Serve without these hooks) get `handlers` unchanged: the proxy replaces them itself."""
    factory = getattr(server, "service_handler_factory", None)
    if factory is None or not hasattr(server, "add_passthrough_service"):
        return handlers
    from ray.serve._private.proxy_request_response import gRPCStreamingType

    server.add_passthrough_service(service)
    routed = {}
    for name, handler in handlers.items():
        method = f"/{service}/{name}"
        if handler.response_streaming:
            stream = factory(service_method=method, streaming_type=gRPCStreamingType.UNARY_STREAM)
            routed[name] = handler._replace(response_serializer=None, unary_stream=stream)
        else:
            unary = factory(service_method=method, streaming_type=gRPCStreamingType.UNARY_UNARY)
            routed[name] = handler._replace(
                response_serializer=None, unary_unary=_trailers_only(unary)
            )
    return routed


def _add(server: Any, service: str, handlers: dict[str, Any]) -> None:
    handlers = _under_serve_proxy(server, service, handlers)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(service, handlers)


def add_InferenceServiceServicer_to_server(servicer: Any, server: Any) -> None:
    """Same methods and response types as the generated function; no request deserializer."""
    handlers = {
        "Complete": grpc.unary_unary_rpc_method_handler(
            servicer.Complete, response_serializer=pb.CompleteResponse.SerializeToString
        ),
        "Chat": grpc.unary_unary_rpc_method_handler(
            servicer.Chat, response_serializer=pb.ChatResponse.SerializeToString
        ),
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, response_serializer=pb.GenerateChunk.SerializeToString
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels, response_serializer=pb.ListModelsResponse.SerializeToString
        ),
        "Health": grpc.unary_unary_rpc_method_handler(
            servicer.Health, response_serializer=pb.HealthResponse.SerializeToString
        ),
    }
    _add(server, SERVICE, handlers)


def add_HealthServicer_to_server(servicer: Any, server: Any) -> None:
    """`grpc.health.v1.Health` (Check, List, Watch), request bytes parsed by the ingress."""
    from grpc_health.v1 import health_pb2

    serialize = health_pb2.HealthCheckResponse.SerializeToString
    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(servicer.Check, response_serializer=serialize),
        "List": grpc.unary_unary_rpc_method_handler(
            servicer.List, response_serializer=health_pb2.HealthListResponse.SerializeToString
        ),
        "Watch": grpc.unary_stream_rpc_method_handler(
            servicer.Watch, response_serializer=serialize
        ),
    }
    _add(server, HEALTH_SERVICE, handlers)
