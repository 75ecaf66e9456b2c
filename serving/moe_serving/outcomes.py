"""How a request that does not succeed ends, at the ingress: one `ClientError` (an HTTP status,
a message, a `Reason`, maybe a Retry-After) for everything that can go wrong, wherever it went
wrong, mapped to an HTTP response, an SSE error chunk or a gRPC status.

`engine_failures` bounds a call to the engine replica by the request's deadline and turns what
can end it early into `ClientError`s: the deadline (504 / DEADLINE_EXCEEDED) and the death of
the engine replica (503 / UNAVAILABLE, retryable: Serve replaces it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any, NoReturn

from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError

from moe_serving.protocol import Reason, error_body


class ClientError(Exception):
    """A request that ends with an error status (HTTP status; mapped to a gRPC code)."""

    def __init__(
        self,
        status: int,
        message: str,
        retry_after_s: int | None = None,
        reason: Reason = Reason.UNSPECIFIED,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s
        self.reason = reason


def replica_lost(exc: BaseException) -> ClientError:
    """The engine replica died mid-request (Serve replaces it): a retryable 503 / UNAVAILABLE."""
    return ClientError(
        503,
        f"the engine replica serving this request went away ({type(exc).__name__}); retry",
        retry_after_s=1,
        reason=Reason.REPLICA_LOST,
    )


@contextlib.asynccontextmanager
async def engine_failures(deadline: float, timeout_s: float) -> AsyncIterator[None]:
    """Bound the block by `deadline` (a `time.monotonic()` time; the request's `timeout_s` is
    named in the message) and raise what ends it early as `ClientError`."""
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            yield
    except TimeoutError as exc:
        raise ClientError(504, f"request timed out after {timeout_s}s") from exc
    except RayActorError as exc:
        raise replica_lost(exc) from exc


# ---- HTTP ------------------------------------------------------------------------------------


def retry_headers(retry_after_s: int | None) -> dict[str, str]:
    return {"Retry-After": str(retry_after_s)} if retry_after_s else {}


def error_response(exc: ClientError) -> JSONResponse:
    return JSONResponse(
        error_body(str(exc), exc.status, "BadRequestError" if exc.status == 400 else "Error"),
        status_code=exc.status,
        headers=retry_headers(exc.retry_after_s),
    )


_SSE_ERROR_TYPES = {504: "TimeoutError", 503: "ServiceUnavailableError"}


def sse_error(exc: ClientError) -> str:
    """The error chunk ending a stream whose status (200) has been sent already."""
    err_type = _SSE_ERROR_TYPES.get(exc.status, "Error")
    return f"data: {json.dumps(error_body(str(exc), exc.status, err_type))}\n\n"


# ---- gRPC ------------------------------------------------------------------------------------

_GRPC_CODE_BY_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND"}


def grpc_code(status: int, reason: Reason) -> Any:
    import grpc

    if reason == Reason.QUEUE_FULL:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if reason in (Reason.MODEL_NOT_FOUND, Reason.NOT_FOUND):
        return grpc.StatusCode.NOT_FOUND
    if status == 504:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if status == 503:
        return grpc.StatusCode.UNAVAILABLE
    name = _GRPC_CODE_BY_STATUS.get(status)
    return getattr(grpc.StatusCode, name) if name else grpc.StatusCode.INTERNAL


class GrpcAbort(Exception):
    """Raised after setting the gRPC status on the context; Ray Serve's proxy sends that status."""


def abort_grpc(grpc_context: Any, code: Any, message: str) -> NoReturn:
    if grpc_context is not None:
        grpc_context.set_code(code)
        grpc_context.set_details(message)
    raise GrpcAbort(f"{code.name}: {message}")


def abort_grpc_with(grpc_context: Any, exc: ClientError) -> NoReturn:
    """`abort_grpc` with the code of `exc`."""
    abort_grpc(grpc_context, grpc_code(exc.status, exc.reason), str(exc))


#: gRPC's retry pushback (gRFC A6 "client retries", grpc/proposal A6-client-retries.md,
#: "Pushback"): trailing metadata telling a client whose service config has a retry policy how
#: many milliseconds to wait before its next attempt (a negative or unparsable value: do not
#: retry). grpcio's core reads this key (it is in `grpc/_cython/cygrpc*.so`).
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


def retry_pushback(retry_after_s: int | None) -> list[tuple[str, str]]:
    """The pushback trailer for a Retry-After of `retry_after_s` seconds (none without one)."""
    return [(RETRY_PUSHBACK_KEY, str(int(retry_after_s * 1000)))] if retry_after_s else []


def refuse_grpc(grpc_context: Any, exc: ClientError) -> None:
    """Set the code and details of `exc` and its retry pushback on the call, without raising:
    the caller then returns an empty response.

    Why not raise: Ray Serve 2.60's gRPC proxy copies a deployment's context (code, details,
    trailing metadata) onto the client's call only together with a returned or yielded result
    (`RayServegRPCContext._set_on_grpc_context`); for a raised exception it keeps the code and
    details only (`Replica._maybe_wrap_grpc_exception`), so the pushback would be lost. A
    unary call with a non-OK code set ends as that status; its empty message is not delivered.
    """
    grpc_context.set_code(grpc_code(exc.status, exc.reason))
    grpc_context.set_details(str(exc))
    pushback = retry_pushback(exc.retry_after_s)
    if pushback:
        grpc_context.set_trailing_metadata(pushback)


def grpc_metadata(grpc_context: Any, key: str) -> str | None:
    if grpc_context is None:
        return None
    for name, value in grpc_context.invocation_metadata():
        if name.lower() == key:
            return str(value)
    return None
