"""What both front ends of the ingress share: its set-up from the `AppConfig`, the API-key and
model checks, and `IngressBase.call_engine`, the one place that starts an engine request and
turns what can go wrong with it into a `ClientError` (`moe_serving.outcomes`).

The ingress deployment is `moe_serving.ingress.Ingress`: HTTP there, gRPC in
`moe_serving.ingress_grpc`, this class under both.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from dataclasses import dataclass
from typing import Any, cast

from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from moe_serving import body_checks, grpc_api, hops, live_state, schemas, tracing
from moe_serving.config import ENGINE_DEPLOYMENT, AppConfig
from moe_serving.metrics import IngressMetrics
from moe_serving.outcomes import ClientError, engine_failures, grpc_metadata
from moe_serving.protocol import Kind, Reason, ResponseHead


@dataclass
class EngineCall:
    """An engine request under way: its head, its one JSON body when it does not stream, and
    the handle's generator (the SSE strings to come when it streams; cancel it when done)."""

    head: ResponseHead
    body: Any
    events: DeploymentResponseGenerator[Any]

    def cancel_when_task_ends(self) -> None:
        """Cancel the engine request when the task streaming it ends, however it ends.

        A streaming generator's own `finally` is not enough: when its consumer's task is
        cancelled while the generator waits at a `yield` (the client went away while a chunk
        was being sent), the generator is left suspended and runs its `finally` only when it is
        garbage-collected, possibly much later, so the engine request ran on for nobody. The
        consumer's task ending is the sure signal; cancelling a finished request is a no-op.
        """
        task = asyncio.current_task()
        if task is not None:
            task.add_done_callback(lambda _task: self.events.cancel())

    def refusal(self) -> ClientError:
        """The engine's refusal (a head and an error body) as the ingress's error."""
        message = grpc_api.error_message(self.body) or "request failed"
        return ClientError(
            self.head.status, message, self.head.retry_after_s, reason=self.head.reason
        )


class IngressBase:
    """Set-up, checks and the engine call of the ingress (no CPU, no model)."""

    def __init__(self, engine: DeploymentHandle, config: AppConfig) -> None:
        self.engine = engine
        self.config = config
        self.model_name = config.engine.served_model_name
        self.timeout_s = config.request_timeout_s
        self.metrics = IngressMetrics()
        self.token_rate = live_state.RateWindow()  # between /metrics scrapes (live cost)
        self.availability = live_state.EngineAvailability(
            ENGINE_DEPLOYMENT, config.engine.data_parallel_size
        )
        self.tracing = tracing.process_tracing(
            config.tracing, f"{config.deployment_name}-ingress", {}
        )
        self.api_key: str | None = None
        if config.api_key_env:
            self.api_key = os.environ.get(config.api_key_env)
            if not self.api_key:
                raise RuntimeError(
                    f"api_key_env={config.api_key_env!r} but that environment variable "
                    "is empty in the serving pod: set it (e.g. from a Secret) or unset api_key_env"
                )

    def _check_key(self, presented: str | None) -> None:
        if self.api_key is None:
            return
        token = (presented or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise ClientError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')")

    def _check_grpc_key(self, grpc_context: Any) -> None:
        self._check_key(grpc_metadata(grpc_context, "authorization"))

    def _check_model(self, body: dict[str, Any]) -> None:
        problem = body_checks.text_problem(body) or schemas.schema_problem(body)
        if problem:
            raise ClientError(400, problem, reason=Reason.INVALID_SCHEMA)
        model = body.get("model")
        if model is not None and model != self.model_name:
            # HTTP 400 (as asked of this API); gRPC NOT_FOUND.
            raise ClientError(
                400,
                f"model {model!r} is not served here; available models: [{self.model_name!r}]",
                reason=Reason.MODEL_NOT_FOUND,
            )

    async def call_engine(
        self, kind: Kind, body: dict[str, Any], span: Any, deadline: float
    ) -> EngineCall:
        """Start an engine request and read its head (and its body when it does not stream) by
        `deadline`. Whatever goes wrong is a `ClientError`, and the engine request is cancelled:
        no engine replica can serve (503), Ray's queue is full (503), the deadline passed
        (504), the replica died (503)."""
        from ray.serve.exceptions import BackPressureError

        gen: DeploymentResponseGenerator[Any] | None = None
        try:
            async with engine_failures(deadline, self.timeout_s):
                app_name = serve.get_replica_context().app_name
                if await self.availability.none_can_serve(app_name):
                    raise ClientError(
                        503,
                        "no engine replica is running (being replaced, or waiting for its "
                        "nodes); retry",
                        retry_after_s=5,
                        reason=Reason.NO_REPLICA,
                    )
                if hops.ENABLED:
                    hops.mark("ingress.call")
                gen = cast(
                    DeploymentResponseGenerator[Any],
                    self.engine.options(stream=True).openai.remote(
                        kind, body, tracing.headers_of(span) if span is not None else None
                    ),
                )
                try:
                    head = await gen.__anext__()
                except BackPressureError as exc:
                    raise ClientError(
                        503, f"server busy: {exc}", retry_after_s=1, reason=Reason.QUEUE_FULL
                    ) from exc
                if hops.ENABLED:
                    hops.mark("ingress.head")
                payload = None if head.stream else await gen.__anext__()
                if hops.ENABLED and payload is not None:
                    hops.mark("ingress.body")
        except BaseException:
            # Refused, failed, or the caller went away (client disconnect, a deadline at the
            # proxy: CancelledError): the engine request must not run on for nobody.
            if gen is not None:
                gen.cancel()
            raise
        return EngineCall(head, payload, gen)
