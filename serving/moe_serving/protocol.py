"""The engine-to-ingress protocol: what an engine replica's `openai` call streams back to the
ingress through Ray Serve's streaming handle (`EngineServer.openai` yields it; the ingress, and
the stand-in engines of the tests, follow it).

One request is one stream of events:

1. first, always, a `ResponseHead`: the HTTP status, whether a stream follows, the `Reason` of
   that status, and for a retryable refusal how long to wait (`retry_after_s`: Retry-After);
2. then, if `head.stream` is False, exactly one JSON body (a dict): the OpenAI response, or for
   a refusal (status other than 200) an OpenAI error body (`error_body`);
   if `head.stream` is True (status 200), SSE strings as vLLM writes them (`data: {...}\\n\\n`,
   the last `data: [DONE]\\n\\n`). A failure once streaming has begun can no longer change the
   status: it is one more chunk carrying an OpenAI error body, `data: {"error": {...}}\\n\\n`.

The engine never raises for a request: every failure is a head and an error body (`Refusal`),
so that no client can make a replica fail. Cancelling the stream (the caller went away, or its
deadline passed) aborts the request inside the engine and frees its admission slot.

The ingress refuses requests of its own (API key, model name, deadline, no or lost replica)
with reasons from the same `Reason`, and maps (status, reason) to HTTP and gRPC answers
(`moe_serving.outcomes`). Everything here crosses Ray's object store by pickle: plain
dataclasses and an Enum of this module, which both ends import.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

Kind = Literal["completions", "chat"]


class Reason(StrEnum):
    """Why a response has its status. The engine's are also the `outcome` of its request
    metrics and spans (`moe_serving.engine_obs`)."""

    OK = "ok"
    # Given by the engine replica.
    INVALID_REQUEST = "invalid_request"
    NOT_FOUND = "not_found"
    QUEUE_FULL = "queue_full"
    INTERNAL = "internal"
    TOOLS_UNAVAILABLE = "tools_unavailable"
    ENGINE_DEAD = "engine_dead"
    # Given by the ingress.
    INVALID_SCHEMA = "invalid_schema"
    MODEL_NOT_FOUND = "model_not_found"
    NO_REPLICA = "no_replica"
    REPLICA_LOST = "replica_lost"
    UNSPECIFIED = ""  # the status says it all (API key, body not JSON, deadline)


@dataclass(frozen=True)
class ResponseHead:
    """First event of every `openai` stream."""

    status: int  # HTTP status: 200, 400, 404, 503, 500
    stream: bool  # True: SSE strings follow; False: exactly one JSON body (dict) follows
    reason: Reason = Reason.OK
    retry_after_s: int | None = None


Event = ResponseHead | dict[str, Any] | str

_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 503: "ServiceUnavailableError"}


def error_body(message: str, status: int, err_type: str = "BadRequestError") -> dict[str, Any]:
    """An OpenAI-style error body (what the `openai` client parses into its exceptions)."""
    return {"error": {"message": message, "type": err_type, "param": None, "code": status}}


@dataclass(frozen=True)
class Refusal:
    """A request the engine answers with an error instead of generating."""

    status: int
    reason: Reason
    message: str
    retry_after_s: int | None = None

    def head(self) -> ResponseHead:
        return ResponseHead(self.status, False, self.reason, self.retry_after_s)

    def body(self) -> dict[str, Any]:
        err_type = _ERROR_TYPES.get(self.status, "InternalServerError")
        return error_body(self.message, self.status, err_type)

    def events(self) -> list[Event]:
        """The whole stream of the refused request: its head and its error body."""
        return [self.head(), self.body()]
