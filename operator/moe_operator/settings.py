"""The operator's configuration: the ONE place the operator package reads environment variables.

The Helm chart sets these (see charts/moe-operator/templates/deployment.yaml); every one has a
default that works for `kopf run --module moe_operator.handlers` on a workstation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

#: The single server-side-apply field manager of every object the operator writes.
FIELD_MANAGER = "moe-operator"
#: User-Agent of the operator's own API client (kopf's requests say "kopf/<version>").
USER_AGENT = "moe-operator/0.1"
ENV_PREFIX = "MOE_OPERATOR_"


class OperatorConfig(BaseModel):
    """Runtime knobs of the operator process (env `MOE_OPERATOR_<FIELD NAME IN CAPITALS>`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: str | None = Field(
        None, description="Namespace the operator pod runs in (webhook Service namespace)."
    )
    webhook_enabled: bool = Field(
        False, description="Serve the validating admission webhook and register it."
    )
    webhook_port: int = Field(
        9443, ge=0, le=65535, description="Port kopf's webhook listens on (0: any free port)."
    )
    webhook_local: bool = Field(
        False,
        description=(
            "Serve the webhook over plain HTTP on 127.0.0.1 and register that URL: only for an "
            "API server on the same machine (development, tests). Off: HTTPS behind the Service."
        ),
    )
    webhook_service: str | None = Field(
        None, description="Service in front of the webhook (the API server calls it)."
    )
    webhook_service_port: int = Field(443, ge=1, le=65535, description="That Service's port.")
    webhook_host: str | None = Field(
        None, description="DNS name in the webhook certificate, e.g. <service>.<ns>.svc."
    )
    webhook_cert_dir: str = Field(
        "/tmp/moe-operator-webhook", description="Where the self-signed webhook cert is written."
    )
    watch_server_timeout: float = Field(
        270.0, gt=0, description="Seconds the API server keeps one watch request open."
    )
    watch_client_timeout: float = Field(
        300.0, gt=0, description="Client-side limit of one watch request (> server timeout)."
    )
    connect_timeout: float = Field(10.0, gt=0, description="TCP connect timeout to the API.")
    request_timeout: float = Field(60.0, gt=0, description="Timeout of one non-watch request.")
    api_workers: int = Field(
        32,
        ge=1,
        le=64,
        description=(
            "Threads of the operator's own API client (the official `kubernetes` client blocks, "
            "so its calls run there, off kopf's event loop) and its pooled connections."
        ),
    )
    retry_delay: float = Field(
        15.0, gt=0, description="Seconds before retrying a reconcile that hit a transient error."
    )
    wait_delay: float = Field(
        30.0, gt=0, description="Seconds between checks while waiting on something external."
    )
    post_events: bool = Field(True, description="Post Kubernetes Events about what was done.")
    live_state_interval: float = Field(
        15.0,
        ge=0,
        description=(
            "Seconds between reads of each ready MoEDeployment's live serving state (queue depth, "
            "replicas, token rate, cost) for its status; 0 turns the reads off."
        ),
    )
    live_state_timeout: float = Field(
        5.0, gt=0, description="Timeout of one live-state read from a Serve application."
    )
    live_state_url: str | None = Field(
        None,
        description=(
            "URL template of the live-state endpoint with {name} and {namespace} (unset: the "
            "rendered HTTP Service, http://<name>-http.<namespace>.svc:<port>/v1/moe/state). "
            "For an operator outside the cluster, e.g. through a port-forward."
        ),
    )
    otlp_endpoint: str | None = Field(
        None,
        description=(
            "OTLP collector for reconcile traces, e.g. http://otel-collector.observability:4317 "
            "(unset: tracing off, nothing exported)."
        ),
    )
    otlp_protocol: Literal["grpc", "http", "http/protobuf"] = Field(
        "grpc",
        description="OTLP transport: grpc (port 4317) or http / http-protobuf (port 4318).",
    )
    trace_sample_ratio: float = Field(
        1.0, ge=0, le=1, description="Fraction of reconcile traces kept (trace-id ratio)."
    )

    def webhook_service_ready(self) -> bool:
        """True when the webhook can be registered through a Service."""
        return bool(self.webhook_service and self.namespace)


def load(environ: Mapping[str, str] | None = None) -> OperatorConfig:
    """Read `MOE_OPERATOR_*` variables; a bad value fails with the variable's name."""
    env = os.environ if environ is None else environ
    values: dict[str, str] = {}
    for name in OperatorConfig.model_fields:
        var = ENV_PREFIX + name.upper()
        if env.get(var, "") != "":
            values[name] = env[var]
    try:
        return OperatorConfig.model_validate(values)
    except ValidationError as err:
        problems = "; ".join(
            f"{ENV_PREFIX}{str(e['loc'][0]).upper()}: {e['msg']}" for e in err.errors()
        )
        raise ValueError(f"invalid operator environment: {problems}") from err
