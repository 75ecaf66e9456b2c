"""The MoEDeployment API (serving.moeoperator.io/v1alpha1): the single source of truth.

Over 450 lines on purpose: it is the one schema (the CRD is generated from it), and each field's
type, bounds, default and description stand together; split, a reader would chase one field.

The CRD's OpenAPI schema is generated from these models (`moe_operator.crdgen`), and the
operator, the CLI and the admission webhook validate with them. Field names are camelCase on the
wire (Kubernetes convention) and snake_case in Python. Extra keys are rejected everywhere, so a typo
in a manifest is an error that names the field instead of a silently ignored setting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from moe_operator import cel
from moe_operator.quantity import QUANTITY_MESSAGE, cel_rule, is_quantity

GROUP = "serving.moeoperator.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "MoEDeployment"
PLURAL = "moedeployments"
SINGULAR = "moedeployment"
SHORT_NAMES = ["moed"]

#: Label keys live under our API group (Kubernetes convention for owned label keys).
LABEL_DEPLOYMENT = f"{GROUP}/deployment"
LABEL_COMPONENT = f"{GROUP}/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "moe-operator"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SOURCE = re.compile(r"^(hf://[^/@\s]+/[^/@\s]+(@[^@\s]+)?|s3://[^/\s]+/\S*|pvc://[^/\s]+(/\S*)?)$")
_LOCAL_SOURCE = re.compile(r"^(/|\./|\.\./|file://|tiny://)\S*$")


@dataclass(frozen=True)
class Rule:
    """One cross-field validation rule, written once, in CEL, with the message saying the fix.

    `cel` goes into the CRD's `x-kubernetes-validations` (the API server evaluates it on the
    wire object, camelCase, defaults applied); `ApiModel`'s validator evaluates the same
    expression on the validated model's wire form (moe_operator.cel, cel-python); both report
    `message`. tests/unit/test_cel.py checks the verdicts on the examples and generated specs.
    """

    cel: str
    message: str

    def holds(self, wire: dict[str, Any]) -> bool:
        """Whether the rule holds for a model's wire form (`ApiModel.to_wire`)."""
        return cel.holds(self.cel, wire)


def _validations(*rules: Rule) -> dict[str, Any]:
    return {"x-kubernetes-validations": [{"rule": r.cel, "message": r.message} for r in rules]}


def _quantity(value: Any) -> str:
    if not is_quantity(value):
        raise ValueError(f"{value!r} is not a valid quantity: {QUANTITY_MESSAGE}")
    return str(value)


Quantity = Annotated[
    str,
    BeforeValidator(_quantity),
    Field(
        json_schema_extra={
            "x-kubernetes-int-or-string": True,
            "x-kubernetes-validations": [{"rule": cel_rule(), "message": QUANTITY_MESSAGE}],
        }
    ),
]
"""A Kubernetes resource quantity ("16", "500m", "64Gi")."""

AutoInt = int | Literal["auto"]
"""A positive size, or "auto" to let the planner choose."""


class ApiModel(BaseModel):
    """Base of every API model: camelCase on the wire, unknown keys rejected."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        validate_default=True,
        # Strict types: `true` is not 1 and "2" is not 2, as in the API server's schema check.
        strict=True,
    )

    #: Cross-field rules of this model; the CRD carries them as CEL (see `Rule`).
    RULES: ClassVar[tuple[Rule, ...]] = ()

    def to_wire(self) -> dict[str, Any]:
        """The model as it appears in a manifest (camelCase, unset optionals dropped)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        # The API server prunes a null of a field that is not nullable (none is: crdgen) and
        # then applies the default: so does this, so `kubectl apply` and Python agree.
        # An unknown key stays, null or not, so it is still refused as unknown.
        if isinstance(data, dict):
            known = {n for name, f in cls.model_fields.items() for n in (name, f.alias)}
            return {k: v for k, v in data.items() if v is not None or k not in known}
        return data

    @model_validator(mode="after")
    def _check_rules(self) -> Self:
        if self.RULES:
            wire = self.to_wire()
            for rule in self.RULES:
                if not rule.holds(wire):
                    raise ValueError(rule.message)
        return self


# --------------------------------------------------------------------------------------- model


class SecretKeyRef(ApiModel):
    """A key in a Secret in the MoEDeployment's namespace.

    The operator never reads the Secret: it only references it from the pods' environment.
    """

    name: str = Field(description="Name of the Secret.", min_length=1, max_length=253)
    key: str = Field("token", description="Key within the Secret.", min_length=1)


class ModelSpec(ApiModel):
    """Which model to serve and how to load it."""

    name: str = Field(
        description="Name clients pass as `model` in OpenAI / gRPC requests.",
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$",
    )
    source: str = Field(
        description=(
            "Where the weights come from: hf://org/name[@revision], s3://bucket/prefix, "
            "pvc://claim/path; local runs also take a path or tiny://<arch> (a tiny random "
            "checkpoint made on the spot)."
        ),
        min_length=1,
    )
    architecture: str | None = Field(
        None,
        description=(
            "Catalog key of the MoE architecture (see `moectl catalog`). Optional when the "
            "source names a cataloged model or is a local checkpoint with a config.json."
        ),
    )
    token_secret_ref: SecretKeyRef | None = Field(
        None, description="Hub/S3 token for the pods (HF_TOKEN); never read by the operator."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights and activation dtype ('auto' = the checkpoint's)."
    )
    max_model_len: int | None = Field(
        None, ge=16, le=1_048_576, description="Context length in tokens; default: the model's."
    )
    quantization: Literal["none", "fp8", "awq", "gptq", "compressed-tensors", "mxfp4"] = Field(
        "none", description="Weight quantization method passed to vLLM."
    )
    tool_call_parser: str | None = Field(
        None, description="vLLM tool-call parser; default from the catalog for the family."
    )
    reasoning_parser: str | None = Field(
        None, description="vLLM reasoning parser; default from the catalog for the family."
    )

    @field_validator("source")
    @classmethod
    def _check_source(cls, value: str) -> str:
        if _SOURCE.match(value) or _LOCAL_SOURCE.match(value):
            return value
        raise ValueError(
            f"unsupported model source {value!r}: use hf://org/name[@revision], "
            "s3://bucket/prefix, pvc://claim/path, an absolute or ./relative path, or tiny://<arch>"
        )

    @property
    def is_local(self) -> bool:
        """True for sources only a local run (`moectl up`) can load."""
        return bool(_LOCAL_SOURCE.match(self.source))


# --------------------------------------------------------------------------------- parallelism


class EPLBSpec(ApiModel):
    """vLLM's expert-parallel load balancer: replicates hot experts and rebalances them."""

    enabled: bool = Field(False, description="Turn on EPLB.")
    redundant_experts: int = Field(
        0, ge=0, le=1024, description="Extra expert replicas spread over the EP ranks."
    )
    window_size: int = Field(1000, ge=1, description="Forward steps of routing statistics kept.")
    step_interval: int = Field(3000, ge=1, description="Forward steps between two rebalances.")
    mode: Literal["manual", "auto"] = Field(
        "manual",
        description=(
            "manual: EPLB as set here. auto: the operator watches status.expertImbalance and, "
            "while EPLB is off, recommends it (condition EPLBRecommended and an Event, with a "
            "redundantExperts count from the observed load) when the imbalance stays at or "
            "above imbalanceThreshold for sustainSeconds; with apply, it also turns EPLB on."
        ),
    )
    apply: bool = Field(
        False,
        description=(
            "auto: apply the recommendation instead of only reporting it: EPLB on with the "
            "recommended redundantExperts, recorded in status.eplbApplied (the spec is left "
            "as written) and rolled out like a spec change. It stays on until apply or mode "
            "auto is removed; the operator never turns it off by itself (no flapping)."
        ),
    )
    imbalance_threshold: float = Field(
        1.3,
        gt=1.0,
        le=100.0,
        description="auto: worst-layer max/mean over EP ranks that counts as imbalanced.",
    )
    sustain_seconds: int = Field(
        600, ge=0, le=86_400, description="auto: how long the imbalance must persist."
    )
    min_interval_seconds: int = Field(
        3600,
        ge=0,
        le=604_800,
        description="auto: least time between two changes of the recommendation.",
    )


All2AllBackend = Literal[
    "auto",
    "naive",
    "allgather_reducescatter",
    "pplx",
    "deepep_high_throughput",
    "deepep_low_latency",
    "flashinfer_all2allv",
]


class ParallelismSpec(ApiModel):
    """How one replica is split over its GPUs. Every size may be 'auto' (the planner chooses)."""

    expert_parallel: bool = Field(
        True, description="Shard the experts over the replica's ranks (EP = TP x DP)."
    )
    tensor_parallel_size: AutoInt = Field(
        "auto", description="Tensor-parallel ranks (attention and dense layers), or 'auto'."
    )
    data_parallel_size: AutoInt = Field(
        "auto", description="Attention data-parallel ranks within a replica, or 'auto'."
    )
    pipeline_parallel_size: AutoInt = Field(1, description="Pipeline stages, or 'auto'.")
    all2all_backend: All2AllBackend = Field(
        "auto",
        alias="all2allBackend",
        description="Expert all-to-all backend ('auto': chosen from the layout).",
    )
    eplb: EPLBSpec = Field(default_factory=EPLBSpec, description="Expert load balancer.")

    @field_validator("tensor_parallel_size", "data_parallel_size", "pipeline_parallel_size")
    @classmethod
    def _positive(cls, value: AutoInt) -> AutoInt:
        if value != "auto" and (not isinstance(value, int) or value < 1):
            raise ValueError("must be a positive integer or 'auto'")
        return value


# ----------------------------------------------------------------------------------- resources

AcceleratorType = Literal["A100-40GB", "A100-80GB", "H100-80GB", "H200-141GB", "L40S-48GB", "CPU"]


class Toleration(ApiModel):
    """A pod toleration (core/v1 Toleration)."""

    key: str | None = Field(None, description="Taint key; empty with Exists matches all.")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="Exists or Equal.")
    value: str | None = Field(None, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; empty = all."
    )
    toleration_seconds: int | None = Field(None, description="For NoExecute: how long to stay.")


class ResourcesSpec(ApiModel):
    """The hardware a replica runs on."""

    accelerator: AcceleratorType = Field(
        "A100-80GB", description="GPU type of the worker nodes (CPU: local runs only)."
    )
    gpus_per_node: int = Field(
        8, ge=1, le=16, description="GPUs on each worker node (ranks per node on CPU)."
    )
    max_nodes_per_replica: int = Field(
        8, ge=1, le=64, description="Upper bound the planner may use for one replica."
    )
    cpu: Quantity = Field("16", description="CPU request of each worker pod.")
    memory: Quantity = Field("128Gi", description="Memory request of each worker pod.")
    shared_memory: Quantity = Field("16Gi", description="Size of /dev/shm (memory emptyDir).")
    gpu_memory_utilization: float = Field(
        0.9, gt=0.1, le=0.98, description="Fraction of GPU memory vLLM may use."
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Node selector for worker pods; the only one they get (the accelerator type alone "
            "selects nothing). E.g. `nvidia.com/gpu.product: NVIDIA-A100-SXM4-80GB` where "
            "NVIDIA GPU Feature Discovery labels the nodes (the value differs on PCIe/NVL parts)."
        ),
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Tolerations for worker pods (e.g. nvidia.com/gpu)."
    )


# --------------------------------------------------------------------------------- autoscaling


class AutoscalingSpec(ApiModel):
    """Replicas follow queue depth (requests waiting at the router and in vLLM)."""

    RULES = (
        Rule(
            "self.minReplicas <= self.maxReplicas",
            "minReplicas must not exceed maxReplicas: lower minReplicas or raise maxReplicas",
        ),
        Rule(
            "self.minReplicas >= 1 || self.scaleToZero",
            "minReplicas 0 needs scaleToZero: true (or set minReplicas >= 1)",
        ),
    )
    model_config = ConfigDict(json_schema_extra=_validations(*RULES))

    enabled: bool = Field(False, description="Scale between minReplicas and maxReplicas.")
    min_replicas: int = Field(1, ge=0, le=1000, description="Lower bound (0 needs scaleToZero).")
    max_replicas: int = Field(1, ge=1, le=1000, description="Upper bound.")
    target_queue_depth: float = Field(
        4.0, gt=0, le=10_000, description="Waiting requests per replica the autoscaler aims at."
    )
    upscale_delay_seconds: float = Field(
        30.0, ge=0, le=3600, description="Overload must last this long before scaling up."
    )
    downscale_delay_seconds: float = Field(
        300.0, ge=0, le=86_400, description="Idleness must last this long before scaling down."
    )
    scale_to_zero: bool = Field(
        False, description="Allow 0 replicas when idle (the first request waits for one)."
    )


# ------------------------------------------------------------------------------------- serving

#: Engine args the planner owns: setting them by hand would contradict the plan.
#: `spec.serving.perExpertMetrics: auto` exports per-expert series up to this many per replica.
PER_EXPERT_SERIES_AUTO_MAX = 4096

PLANNER_OWNED_ENGINE_ARGS = frozenset(
    {
        "tensor_parallel_size",
        "data_parallel_size",
        "data_parallel_size_local",
        "pipeline_parallel_size",
        "enable_expert_parallel",
        "all2all_backend",
        "enable_eplb",
        "eplb_config",
        "num_redundant_experts",
        "distributed_executor_backend",
        "model",
        "served_model_name",
        "max_model_len",
        "dtype",
        "quantization",
        "revision",
    }
)

#: Engine args users may pass through, with the JSON types accepted for each.
ALLOWED_ENGINE_ARGS: dict[str, tuple[type, ...]] = {
    "max_num_seqs": (int,),
    "max_num_batched_tokens": (int,),
    "enable_prefix_caching": (bool,),
    "enable_chunked_prefill": (bool,),
    "kv_cache_dtype": (str,),
    "block_size": (int,),
    "swap_space": (int, float),
    "seed": (int,),
    "enforce_eager": (bool,),
    "trust_remote_code": (bool,),
    "tokenizer_mode": (str,),
    "guided_decoding_backend": (str,),
    "max_logprobs": (int,),
    "disable_log_stats": (bool,),
    "long_prefill_token_threshold": (int,),
    "generation_config": (str,),
    "override_generation_config": (dict,),
    "limit_mm_per_prompt": (dict,),
}


class ServingSpec(ApiModel):
    """The serving front end of each replica."""

    RULES = (
        Rule(
            "self.httpPort != self.grpcPort",
            "httpPort and grpcPort must differ",
        ),
    )
    model_config = ConfigDict(json_schema_extra=_validations(*RULES))

    http_port: int = Field(8000, ge=1024, le=65535, description="OpenAI-compatible HTTP port.")
    grpc_port: int = Field(9000, ge=1024, le=65535, description="gRPC port (moe.inference.v1).")
    request_timeout_seconds: float = Field(
        600.0, gt=0, le=86_400, description="Deadline of one request, queueing included."
    )
    max_ongoing_requests: int = Field(
        64, ge=1, le=100_000, description="Requests one replica runs concurrently."
    )
    max_queued_requests: int = Field(
        256, ge=0, le=1_000_000, description="Requests waiting per replica before 503."
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Extra vLLM engine args (snake_case). Parallelism, model and dtype keys are owned by "
            "the planner and rejected here."
        ),
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    api_key_secret_ref: SecretKeyRef | None = Field(
        None,
        description=(
            "When set, the OpenAI paths and every gRPC method require this key as "
            "'Authorization: Bearer <key>' (HTTP header or gRPC metadata)."
        ),
    )
    prefix_affinity: Literal["auto", "on", "off"] = Field(
        "auto",
        description=(
            "Prefix-cache-aware routing: send each request to the engine replica that holds its "
            "longest known prompt prefix (agents re-send the same system prompt and tools) "
            "unless that replica is busier than the others by a queue's worth. auto: on when a "
            "deployment can have more than one engine replica (maxReplicas > 1 or data "
            "parallelism)."
        ),
    )
    per_expert_metrics: Literal["auto", "on", "off"] = Field(
        "auto",
        description=(
            "Export tokens per (MoE layer, expert) as Prometheus series (layers x experts per "
            "replica: ~15k for DeepSeek-V3). auto: on up to "
            f"{PER_EXPERT_SERIES_AUTO_MAX} series. Bounded imbalance series (per layer: max/mean "
            "over EP ranks and experts, top experts) are exported either way."
        ),
    )

    @field_validator("engine_args")
    @classmethod
    def _check_engine_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key, arg in value.items():
            if key in PLANNER_OWNED_ENGINE_ARGS:
                raise ValueError(
                    f"engineArgs.{key} is set by the planner; use spec.model / spec.parallelism "
                    "instead"
                )
            if key not in ALLOWED_ENGINE_ARGS:
                allowed = ", ".join(sorted(ALLOWED_ENGINE_ARGS))
                raise ValueError(
                    f"engineArgs.{key} is not a supported engine arg; use one of: {allowed}"
                )
            types = ALLOWED_ENGINE_ARGS[key]
            if (isinstance(arg, bool) and bool not in types) or not isinstance(arg, types):
                names = " or ".join(t.__name__ for t in types)
                raise ValueError(f"engineArgs.{key} must be {names}, got {type(arg).__name__}")
        return value


class TracingSpec(ApiModel):
    """OpenTelemetry export of every request's trace."""

    RULES = (
        Rule(
            "!self.enabled || has(self.endpoint)",
            "tracing.enabled needs tracing.endpoint (an OTLP collector URL)",
        ),
    )
    model_config = ConfigDict(json_schema_extra=_validations(*RULES))

    enabled: bool = Field(False, description="Export request spans.")
    endpoint: str | None = Field(
        None,
        description="OTLP endpoint, e.g. http://otel-collector.observability:4317.",
        pattern=r"^https?://\S+$",
    )
    protocol: Literal["grpc", "http/protobuf"] = Field("grpc", description="OTLP transport.")
    sample_ratio: float = Field(1.0, ge=0, le=1, description="Fraction of new traces sampled.")
    record_content: bool = Field(
        False, description="Record prompt and output text on spans (off: never recorded)."
    )


class PricingSpec(ApiModel):
    """Hourly price used for cost estimates (defaults per accelerator are documented)."""

    hourly_price_per_gpu: float | None = Field(
        None, ge=0, description="USD per GPU-hour; default from the accelerator catalog."
    )


class NetworkPolicySpec(ApiModel):
    """Optional NetworkPolicy around the replicas."""

    enabled: bool = Field(False, description="Render a NetworkPolicy.")
    allowed_client_labels: dict[str, str] = Field(
        default_factory=dict,
        description="Pod labels of clients allowed to the inference ports (empty: namespace).",
    )
    kuberay_namespace: str = Field(
        "ray-system",
        description="Namespace of the KubeRay operator, which must reach the Ray dashboard.",
        min_length=1,
    )
    operator_namespace: str = Field(
        "moe-system",
        description=(
            "Namespace of this operator, which reads GET /v1/moe/state on the HTTP port for the "
            "live status (default: where the chart's README and install bundle install it)."
        ),
        min_length=1,
        max_length=63,
    )
    prometheus_namespace: str = Field(
        "monitoring",
        description=(
            "Namespace of the Prometheus that scrapes /metrics on the HTTP port; empty: no "
            "scrape rule (null means the default, as the API server prunes nulls)."
        ),
        max_length=63,
    )
    prometheus_pod_labels: dict[str, str] = Field(
        default_factory=lambda: {"app.kubernetes.io/name": "prometheus"},
        description=(
            "Labels of the Prometheus pods in prometheusNamespace (prometheus-operator's by "
            "default; empty: every pod of that namespace)."
        ),
    )


UpgradeStrategy = Literal["NewCluster", "NewClusterWithIncrementalUpgrade", "None"]

# KubeRay refuses NewClusterWithIncrementalUpgrade without its in-tree autoscaler or a gateway
# class (ray-operator/controllers/ray/utils/validation.go, ValidateClusterUpgradeOptions): the
# RayService would never deploy and the MoEDeployment would stay Progressing.
INCREMENTAL_NEEDS_AUTOSCALER = (
    "upgradeStrategy NewClusterWithIncrementalUpgrade needs KubeRay's autoscaler: unset "
    "replicas and set autoscaling.enabled: true with minReplicas < maxReplicas, or use "
    "upgradeStrategy NewCluster"
)
INCREMENTAL_NEEDS_GATEWAY_CLASS = (
    "upgradeStrategy NewClusterWithIncrementalUpgrade needs gatewayClassName: the Gateway API "
    "GatewayClass of the Gateway KubeRay creates to shift traffic (e.g. istio)"
)


class MoEDeploymentSpec(ApiModel):
    """Desired state of a MoEDeployment."""

    RULES = (
        Rule(
            "!has(self.replicas) || self.replicas > 0 || self.autoscaling.scaleToZero",
            "replicas 0 needs autoscaling.scaleToZero: true",
        ),
        Rule(
            "self.upgradeStrategy != 'NewClusterWithIncrementalUpgrade'"
            " || (!has(self.replicas) && self.autoscaling.enabled"
            " && self.autoscaling.minReplicas < self.autoscaling.maxReplicas)",
            INCREMENTAL_NEEDS_AUTOSCALER,
        ),
        Rule(
            "self.upgradeStrategy != 'NewClusterWithIncrementalUpgrade'"
            " || has(self.gatewayClassName)",
            INCREMENTAL_NEEDS_GATEWAY_CLASS,
        ),
    )
    model_config = ConfigDict(json_schema_extra=_validations(*RULES))

    model: ModelSpec = Field(description="The model to serve.")
    parallelism: ParallelismSpec = Field(
        default_factory=ParallelismSpec, description="Expert / tensor / data parallel layout."
    )
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, description="Accelerators and pod resources."
    )
    replicas: int | None = Field(
        None,
        ge=0,
        le=1000,
        description=(
            "Fixed replica count. Set (also by `kubectl scale`), it pins autoscaling to this "
            "count; "
            "unset, replicas follow autoscaling (or 1)."
        ),
    )
    autoscaling: AutoscalingSpec = Field(
        default_factory=AutoscalingSpec, description="Queue-depth autoscaling."
    )
    serving: ServingSpec = Field(default_factory=ServingSpec, description="HTTP / gRPC front end.")
    tracing: TracingSpec = Field(default_factory=TracingSpec, description="OpenTelemetry.")
    pricing: PricingSpec = Field(default_factory=PricingSpec, description="Cost estimates.")
    network_policy: NetworkPolicySpec = Field(
        default_factory=NetworkPolicySpec, description="Optional NetworkPolicy."
    )
    image: str = Field(
        "ghcr.io/moe-operator/moe-serving:0.1.0",
        description="Serving image (Ray + vLLM + moe_serving) for head and worker pods.",
        min_length=1,
    )
    ray_version: str = Field(
        "2.60.0", description="Ray version in the image.", pattern=r"^\d+\.\d+\.\d+$"
    )
    upgrade_strategy: UpgradeStrategy = Field(
        "NewCluster",
        description=(
            "How KubeRay rolls a changed spec (KubeRay upgradeStrategy). NewCluster starts a "
            "whole second cluster and switches traffic once it is ready: twice the GPUs during "
            "an upgrade. NewClusterWithIncrementalUpgrade shifts traffic in steps through a "
            "Gateway (needs autoscaling and gatewayClassName). None: spec changes are not rolled "
            "out to a new cluster."
        ),
    )
    gateway_class_name: str | None = Field(
        None,
        description=(
            "Gateway API GatewayClass for KubeRay's Gateway with upgradeStrategy "
            "NewClusterWithIncrementalUpgrade (e.g. istio); required there, unused otherwise."
        ),
        min_length=1,
        max_length=253,
    )

    def replica_bounds(self) -> tuple[int, int, int]:
        """(min, initial, max) replicas: `replicas` pins all three, else autoscaling decides."""
        if self.replicas is not None:
            return self.replicas, self.replicas, max(self.replicas, 1)
        if self.autoscaling.enabled:
            low, high = self.autoscaling.min_replicas, self.autoscaling.max_replicas
            return low, low, high
        return 1, 1, 1


# -------------------------------------------------------------------------------------- status


class Condition(ApiModel):
    """A standard Kubernetes condition (metav1.Condition)."""

    type: str = Field(
        description="Ready, Progressing, Degraded, ToolCallingAvailable or ReasoningAvailable."
    )
    status: Literal["True", "False", "Unknown"] = Field(description="Condition status.")
    reason: str = Field(description="CamelCase machine-readable reason.", pattern=r"^[A-Za-z]\w*$")
    message: str = Field("", description="Human-readable detail: what happened, what to fix.")
    last_transition_time: str = Field(description="RFC 3339 time the status last changed.")
    observed_generation: int | None = Field(None, description="Generation this was computed for.")


class PlanStatus(ApiModel):
    """The layout the planner chose."""

    architecture: str = Field(description="Catalog key of the model architecture.")
    expert_parallel_size: int = Field(description="EP ranks per replica (1 = no EP).")
    tensor_parallel_size: int = Field(description="TP ranks per replica.")
    data_parallel_size: int = Field(description="Attention-DP ranks per replica.")
    pipeline_parallel_size: int = Field(description="PP stages per replica.")
    gpus_per_replica: int = Field(description="Accelerators per replica.")
    nodes_per_replica: int = Field(description="Nodes per replica.")
    experts_per_rank: int = Field(description="Expert slots per EP rank (redundant included).")
    summary: str = Field(description="One-line description, e.g. 'EP8 TP8 x 1 node'.")


class Endpoints(ApiModel):
    """In-cluster addresses clients use."""

    http: str | None = Field(None, description="OpenAI-compatible base URL.")
    grpc: str | None = Field(None, description="gRPC target host:port.")
    gateway: str | None = Field(
        None,
        description=(
            "Under upgradeStrategy NewClusterWithIncrementalUpgrade, instead of http/grpc: the "
            "Gateway KubeRay creates (namespace/name:port; HTTP only, its address is in the "
            "Gateway's status.addresses)."
        ),
    )


class EPLBApplied(ApiModel):
    """EPLB as the operator turned it on under parallelism.eplb.mode auto with apply."""

    redundant_experts: int = Field(ge=0, description="Redundant experts it was turned on with.")
    imbalance: float = Field(description="The sustained expert imbalance that triggered it.")
    time: str = Field(description="RFC 3339 time it was applied.")


class MoEDeploymentStatus(ApiModel):
    """Observed state of a MoEDeployment."""

    observed_generation: int | None = Field(None, description="Last generation reconciled.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description=(
            "Ready/Progressing/Degraded, and ToolCallingAvailable/ReasoningAvailable when the "
            "plan configures those parsers (False: the checkpoint's tokenizer cannot support "
            "the parser, so the model is served without it)."
        ),
    )
    replicas: int | None = Field(None, description="Serving replicas that exist.")
    ready_replicas: int | None = Field(None, description="Serving replicas ready.")
    desired_replicas: int | None = Field(
        None,
        description="Replicas the Serve autoscaler targets (live), else the planned initial count.",
    )
    selector: str | None = Field(None, description="Label selector of the worker pods (scale).")
    plan: PlanStatus | None = Field(None, description="The chosen parallel layout.")
    endpoints: Endpoints | None = Field(None, description="Service addresses.")
    queue_depth: float | None = Field(
        None,
        description=(
            "Requests waiting per serving replica (admission queue + vLLM's waiting), read from "
            "the Serve application on the operator's live-state interval."
        ),
    )
    serving_replicas: int | None = Field(
        None, description="Engine replicas running in the Serve application (live)."
    )
    output_tokens_per_second: float | None = Field(
        None, description="Output tokens per second over the last live-state interval."
    )
    cost_per_million_tokens: float | None = Field(
        None,
        description=(
            "Live USD per million output tokens: hourly price of the serving replicas divided "
            "by the observed output rate (absent while idle)."
        ),
    )
    expert_imbalance: float | None = Field(
        None,
        description=(
            "Worst MoE layer's max / mean tokens over the EP ranks of an engine (1.0 = even), "
            "over the replicas' last minute of routing; absent without expert parallelism "
            "traffic. Read on the live-state interval."
        ),
    )
    eplb_applied: EPLBApplied | None = Field(
        None,
        description=(
            "Set when the operator applied EPLB (parallelism.eplb.mode auto with apply): the "
            "deployment runs with EPLB on and these redundant experts; absent otherwise."
        ),
    )
    ray_service: str | None = Field(None, description="Name of the owned RayService.")


class ObjectMeta(BaseModel):
    """The subset of metadata the CLI needs; everything else is kept as is."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(description="Object name (a DNS-1035 label).", max_length=40)
    namespace: str = Field("default", description="Namespace.")

    @field_validator("name")
    @classmethod
    def _dns(cls, value: str) -> str:
        if not _DNS_LABEL.match(value) or value[0].isdigit():
            raise ValueError(
                f"name {value!r} must be a DNS-1035 label: lowercase letters, digits and '-', "
                "starting with a letter, at most 40 characters (children add suffixes)"
            )
        return value


class MoEDeployment(ApiModel):
    """A whole MoEDeployment object as read from a manifest."""

    api_version: Literal["serving.moeoperator.io/v1alpha1"] = Field(description="API version.")
    kind: Literal["MoEDeployment"] = Field(description="Kind.")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    spec: MoEDeploymentSpec = Field(description="Desired state.")
    status: MoEDeploymentStatus | None = Field(None, description="Observed state.")
