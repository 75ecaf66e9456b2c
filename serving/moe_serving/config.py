"""Arguments of the Ray Serve application: the contract between the operator and the replicas.

The operator renders an `AppConfig` into the RayService's `serveConfigV2` (`applications[].args`);
`moectl up` builds the very same object locally. This module imports only pydantic so that the
operator can use it without Ray or vLLM.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class EPLBArgs(_Strict):
    """vLLM's expert-parallel load balancer settings."""

    enabled: bool = Field(False, description="Turn on vLLM's EPLB (redundant, rebalanced experts).")
    num_redundant_experts: int = Field(
        0, ge=0, description="Extra expert replicas spread over ranks."
    )
    window_size: int = Field(1000, ge=1, description="Steps of routing statistics kept.")
    step_interval: int = Field(3000, ge=1, description="Steps between two rebalances.")


class EngineArgs(_Strict):
    """How one replica's vLLM engine is started."""

    model: str = Field(description="Local path or hub id of the checkpoint the engine loads.")
    served_model_name: str = Field(description="Name clients pass as `model`.")
    revision: str | None = Field(None, description="Hub revision, when `model` is a hub id.")
    dtype: str = Field("auto", description="Weights/activation dtype passed to vLLM.")
    max_model_len: int | None = Field(None, ge=1, description="Context length; None = model's.")
    quantization: str | None = Field(None, description="vLLM quantization method, if any.")
    tensor_parallel_size: int = Field(1, ge=1, description="TP ranks per replica.")
    data_parallel_size: int = Field(1, ge=1, description="Attention-DP ranks per replica.")
    pipeline_parallel_size: int = Field(1, ge=1, description="PP stages per replica.")
    enable_expert_parallel: bool = Field(False, description="Shard experts over TP x DP ranks.")
    all2all_backend: str | None = Field(None, description="vLLM all-to-all backend for EP.")
    eplb: EPLBArgs = Field(default_factory=EPLBArgs, description="Expert load balancer.")
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        None, description="How ranks are started: 'mp' on one node, 'ray' across nodes."
    )
    enforce_eager: bool = Field(False, description="Disable graph capture (always on the CPU).")
    tool_call_parser: str | None = Field(None, description="vLLM tool-call parser name.")
    reasoning_parser: str | None = Field(None, description="vLLM reasoning parser name.")
    extra: dict[str, Any] = Field(
        default_factory=dict, description="Further vLLM engine args (validated by the operator)."
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Environment variables set in the replica before vLLM starts, e.g. "
            "VLLM_CPU_KVCACHE_SPACE or VLLM_CPU_OMP_THREADS_BIND."
        ),
    )


class AutoscalingArgs(_Strict):
    """Replica count policy: follows queue depth per replica."""

    min_replicas: int = Field(1, ge=0, description="Lower bound; 0 allows scale to zero.")
    max_replicas: int = Field(1, ge=1, description="Upper bound.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy time.")
    target_queue_depth: float = Field(4.0, gt=0, description="Queued+waiting requests per replica.")
    upscale_delay_s: float = Field(30.0, ge=0, description="Sustained overload before scaling up.")
    downscale_delay_s: float = Field(
        300.0, ge=0, description="Sustained idleness before scaling down."
    )
    look_back_period_s: float = Field(
        30.0, gt=0, description="Window over which replicas' queue metrics are averaged."
    )
    metrics_interval_s: float = Field(
        10.0, gt=0, description="How often replicas push their queue metrics to Serve."
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingArgs:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"autoscaling.min_replicas ({self.min_replicas}) exceeds max_replicas "
                f"({self.max_replicas}): lower min_replicas or raise max_replicas"
            )
        return self


class TracingArgs(_Strict):
    """OpenTelemetry export of request spans."""

    enabled: bool = Field(False, description="Export spans.")
    endpoint: str | None = Field(
        None, description="OTLP endpoint, e.g. http://otel-collector:4317."
    )
    protocol: Literal["grpc", "http/protobuf"] = Field("grpc", description="OTLP transport.")
    sample_ratio: float = Field(1.0, ge=0, le=1, description="Parent-based trace-id ratio sampler.")
    console: bool = Field(False, description="Also print spans to stdout (local runs).")
    jsonl_path: str | None = Field(None, description="Also append spans to this JSONL file.")
    record_content: bool = Field(False, description="Record prompt/output text on spans.")


class ReplicaResources(_Strict):
    """Ray resources one serving replica reserves (its placement group bundles)."""

    num_cpus_per_rank: float = Field(1.0, ge=0, description="CPUs per engine rank.")
    num_gpus_per_rank: float = Field(0.0, ge=0, description="GPUs per engine rank.")
    accelerator_type: str | None = Field(None, description="Ray accelerator_type label, if any.")
    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "PACK", description="How a replica's rank bundles are placed on nodes."
    )


class AppConfig(_Strict):
    """All that `moe_serving.app:build_app` needs: what the operator renders into serveConfigV2."""

    deployment_name: str = Field("moe", description="Name of the owning MoEDeployment.")
    engine: EngineArgs
    resources: ReplicaResources = Field(default_factory=ReplicaResources)
    autoscaling: AutoscalingArgs = Field(default_factory=AutoscalingArgs)
    max_queued_requests: int = Field(
        64, ge=0, description="Waiting requests per replica before 503."
    )
    max_ongoing_requests: int = Field(32, ge=1, description="Requests a replica runs at once.")
    request_timeout_s: float = Field(600.0, gt=0, description="Per-request deadline.")
    tracing: TracingArgs = Field(default_factory=TracingArgs)
    api_key_env: str | None = Field(
        None, description="Env var holding the API key; when set, requests must present it."
    )
    hourly_cost_per_replica_usd: float | None = Field(
        None,
        ge=0,
        description=(
            "USD per hour of one replica (the plan's price) for the live cost metric; "
            "None: no cost series."
        ),
    )
    prefix_affinity: bool = Field(
        False,
        description=(
            "Route each request to the engine replica holding its longest known prompt prefix "
            "while load is balanced (moe_serving.routing); off: Serve's power of two choices."
        ),
    )
    imbalance_window_s: float = Field(
        60.0, gt=0, le=3600, description="Window of the expert-imbalance signals, seconds."
    )
    per_expert_metrics: bool = Field(
        True,
        description=(
            "Export moe_expert_tokens_total{layer,expert} (MoE layers x experts series); the "
            "bounded imbalance series are exported either way."
        ),
    )


#: What a Serve config (RayService serveConfigV2 or a local run) points at.
APP_IMPORT_PATH = "moe_serving.app:build_app"
APP_NAME = "moe"
#: The application's two deployments (`moe_serving.app`): the vLLM engine and its front end.
ENGINE_DEPLOYMENT = "LLMEngine"
INGRESS_DEPLOYMENT = "Ingress"
GRPC_SERVICER_FUNCTIONS = [
    "moe_serving.grpc_servicer.add_InferenceServiceServicer_to_server",
    # The standard grpc.health.v1 service: Kubernetes gRPC probes, grpc_health_probe, meshes.
    "moe_serving.grpc_servicer.add_HealthServicer_to_server",
]
