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
"""

from __future__ import annotations

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
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(SERVICE, handlers)


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
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(HEALTH_SERVICE, handlers),)
    )
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(HEALTH_SERVICE, handlers)
