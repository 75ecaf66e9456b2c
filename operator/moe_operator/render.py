"""Render a plan into Kubernetes objects (pure: no client, no I/O).

Over 450 lines on purpose: the children name, label and select each other (the RayService's
pods, the Services, the PDB's selector, the NetworkPolicy's peers and ports); kept in one module,
every such cross-reference is checked by reading one file.

Children of a MoEDeployment `<name>`:

* RayService `<name>` (ray.io/v1): a head group (GCS, dashboard, Serve controller; no GPUs) and
  one worker group whose every "replica" is a multi-host slice of `numOfHosts` pods, so one Serve
  replica's EP ranks land on one slice and the in-tree autoscaler adds or removes whole slices.
  `serveConfigV2` imports `moe_serving.app:build_app` with the `AppConfig` built here.
  Its `serveService` shapes the Service KubeRay makes, `<name>-serve-svc` (HTTP and gRPC): KubeRay
  points it at the pods of the one cluster that serves (`ray.io/cluster`) and switches it when
  an upgrade's new cluster is ready.
* Services `<name>-http` (OpenAI HTTP) and `<name>-grpc` (gRPC): DNS aliases (ExternalName) of
  `<name>-serve-svc`, so clients never reach two clusters at once during an upgrade.
  Not under `NewClusterWithIncrementalUpgrade`: there KubeRay ignores `serveService` and makes no
  `<name>-serve-svc`, but a Serve Service per RayCluster, `<cluster>-serve-svc`, and a Gateway
  `<name>-gateway` (one HTTP listener, port 80) whose HTTPRoute `<name>-httproute` splits
  traffic between the clusters (ray-operator/controllers/ray/common/service.go,
  BuildServeService; rayservice_controller.go, createGateway / createHTTPRoute). An alias would
  point at nothing, so clients use the Gateway (HTTP only) and the operator reads the live state
  from the active cluster's Service (`serving_base_url`).
* PodDisruptionBudget `<name>-workers`, and optionally NetworkPolicy `<name>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from moe_operator.api import (
    API_VERSION,
    KIND,
    LABEL_COMPONENT,
    LABEL_DEPLOYMENT,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    PER_EXPERT_SERIES_AUTO_MAX,
    MoEDeploymentSpec,
)
from moe_operator.catalog import ACCELERATORS
from moe_operator.planner import Plan
from moe_serving.config import (
    APP_IMPORT_PATH,
    APP_NAME,
    GRPC_SERVICER_FUNCTIONS,
    AppConfig,
    AutoscalingArgs,
    EngineArgs,
    EPLBArgs,
    ReplicaResources,
    TracingArgs,
)

#: Where pvc:// sources are mounted in the worker pods.
MODELS_MOUNT = "/models"
RAY_UID = 1000  # the uid of the `ray` user in Ray's images

HEAD_CPU = "4"
HEAD_MEMORY = "16Gi"

#: KubeRay puts the head container's ports named "serve" and "serve-*" into its serve Service
#: (ray-operator/controllers/ray/common/service.go, isServingPort, KubeRay >= 1.6).
SERVE_PORT_NAME = "serve"
SERVE_GRPC_PORT_NAME = "serve-grpc"
#: The cluster DNS domain of the ExternalName aliases (Kubernetes' default).
CLUSTER_DOMAIN = "cluster.local"


def serve_service_name(name: str) -> str:
    """KubeRay's serve Service of RayService `name` (utils.GenerateServeServiceName); under an
    incremental upgrade strategy, of each RayCluster `name`."""
    return f"{name}-serve-svc"


INCREMENTAL = "NewClusterWithIncrementalUpgrade"
#: KubeRay's Gateway listener (ray-operator/controllers/ray/utils/constant.go).
GATEWAY_HTTP_PORT = 80


def gateway_name(name: str) -> str:
    """The Gateway KubeRay makes for RayService `name` under an incremental upgrade strategy
    (rayservice_controller.go createGateway; common/association.go)."""
    return f"{name}-gateway"


def serving_base_url(
    owner: Owner, spec: MoEDeploymentSpec, ray_service: dict[str, Any] | None
) -> str | None:
    """The OpenAI base URL of the Service that serves the application now (the operator's
    live-state reads): KubeRay's `<name>-serve-svc`, or under an incremental upgrade strategy
    the active cluster's `<cluster>-serve-svc` (None while no cluster is active)."""
    host = serve_service_name(owner.name)
    if spec.upgrade_strategy == INCREMENTAL:
        status = (ray_service or {}).get("status") or {}
        cluster = (status.get("activeServiceStatus") or {}).get("rayClusterName")
        if not cluster:
            return None
        host = serve_service_name(str(cluster))
    return f"http://{host}.{owner.namespace}.svc:{spec.serving.http_port}/v1"


@dataclass(frozen=True)
class Owner:
    """The MoEDeployment that owns the rendered children."""

    name: str
    namespace: str
    uid: str
    generation: int = 1


class RenderError(ValueError):
    """The spec cannot be rendered for a cluster; the message says what to change."""


def labels_for(name: str, component: str | None = None) -> dict[str, str]:
    """Labels every child of MoEDeployment `name` carries."""
    labels = {
        LABEL_DEPLOYMENT: name,
        LABEL_MANAGED_BY: MANAGED_BY,
        "app.kubernetes.io/name": "moe-deployment",
        "app.kubernetes.io/instance": name,
    }
    if component:
        labels[LABEL_COMPONENT] = component
    return labels


def _metadata(owner: Owner, name: str, component: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels_for(owner.name, component),
        "ownerReferences": [
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": owner.name,
                "uid": owner.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }


# ---------------------------------------------------------------------------- serving app args


def engine_model(spec: MoEDeploymentSpec) -> tuple[str, str | None]:
    """(model argument for vLLM, revision) for a cluster source."""
    source = spec.model.source
    if source.startswith("hf://"):
        repo, _, revision = source.removeprefix("hf://").partition("@")
        return repo, revision or None
    if source.startswith("pvc://"):
        claim, _, path = source.removeprefix("pvc://").partition("/")
        return f"{MODELS_MOUNT}/{claim}/{path}".rstrip("/"), None
    return source, None  # s3:// (vLLM streams it) or a local path (local runs)


def app_config(
    name: str,
    spec: MoEDeploymentSpec,
    plan: Plan,
    *,
    model_path: str | None = None,
    tracing_overrides: dict[str, Any] | None = None,
) -> AppConfig:
    """The serving application's arguments: shared by the RayService and `moectl up`."""
    model, revision = (model_path, None) if model_path else engine_model(spec)
    cpu = plan.accelerator == "CPU"
    extra = dict(spec.serving.engine_args)
    if model.startswith("s3://"):
        extra.setdefault("load_format", "runai_streamer")
    eplb = spec.parallelism.eplb
    low, initial, high = plan.min_replicas, plan.initial_replicas, plan.max_replicas
    tracing = spec.tracing
    tracing_args = TracingArgs(
        enabled=tracing.enabled,
        endpoint=tracing.endpoint,
        protocol=tracing.protocol,
        sample_ratio=tracing.sample_ratio,
        record_content=tracing.record_content,
    )
    if tracing_overrides:
        tracing_args = tracing_args.model_copy(update=tracing_overrides)
    return AppConfig(
        deployment_name=name,
        engine=EngineArgs(
            model=model,
            served_model_name=spec.model.name,
            revision=revision,
            dtype="float32" if cpu and spec.model.dtype == "auto" else spec.model.dtype,
            max_model_len=spec.model.max_model_len,
            quantization=None if spec.model.quantization == "none" else spec.model.quantization,
            tensor_parallel_size=plan.tensor_parallel_size,
            data_parallel_size=plan.data_parallel_size,
            pipeline_parallel_size=plan.pipeline_parallel_size,
            enable_expert_parallel=plan.expert_parallel_size > 1,
            all2all_backend=plan.all2all_backend,
            eplb=EPLBArgs(
                enabled=eplb.enabled and plan.expert_parallel_size > 1,
                num_redundant_experts=plan.redundant_experts,
                window_size=eplb.window_size,
                step_interval=eplb.step_interval,
            ),
            distributed_executor_backend="mp" if plan.executor == "mp" else "ray",
            enforce_eager=cpu,
            tool_call_parser=plan.tool_call_parser,
            reasoning_parser=plan.reasoning_parser,
            extra=extra,
        ),
        resources=ReplicaResources(
            num_cpus_per_rank=1.0,
            num_gpus_per_rank=0.0 if cpu else 1.0,
            accelerator_type=None
            if cpu
            else ACCELERATORS[plan.accelerator].ray_accelerator_type or None,
            placement_strategy="STRICT_PACK" if plan.nodes_per_replica == 1 else "PACK",
        ),
        autoscaling=AutoscalingArgs(
            min_replicas=low,
            max_replicas=high,
            initial_replicas=initial,
            target_queue_depth=spec.autoscaling.target_queue_depth,
            upscale_delay_s=spec.autoscaling.upscale_delay_seconds,
            downscale_delay_s=spec.autoscaling.downscale_delay_seconds,
        ),
        max_queued_requests=spec.serving.max_queued_requests,
        max_ongoing_requests=spec.serving.max_ongoing_requests,
        request_timeout_s=spec.serving.request_timeout_seconds,
        tracing=tracing_args,
        api_key_env="MOE_API_KEY" if spec.serving.api_key_secret_ref else None,
        hourly_cost_per_replica_usd=plan.hourly_cost_per_replica,
        per_expert_metrics=per_expert_metrics(spec, plan),
        prefix_affinity=prefix_affinity(spec, plan),
    )


def prefix_affinity(spec: MoEDeploymentSpec, plan: Plan) -> bool:
    """`spec.serving.prefixAffinity`, auto resolved: on when there can be several engine
    replicas to choose from."""
    choice = spec.serving.prefix_affinity
    if choice != "auto":
        return choice == "on"
    return plan.max_replicas > 1 or plan.data_parallel_size > 1


def per_expert_metrics(spec: MoEDeploymentSpec, plan: Plan) -> bool:
    """`spec.serving.perExpertMetrics`, with auto resolved by the series it would make."""
    choice = spec.serving.per_expert_metrics
    if choice != "auto":
        return choice == "on"
    return plan.num_moe_layers * plan.num_experts <= PER_EXPERT_SERIES_AUTO_MAX


def serve_config(owner: Owner, spec: MoEDeploymentSpec, plan: Plan) -> dict[str, Any]:
    """The Serve config document KubeRay sends to the dashboard's Serve REST API."""
    args = app_config(owner.name, spec, plan).model_dump(mode="json", exclude_none=True)
    return {
        "proxy_location": "EveryNode",
        "http_options": {
            "host": "0.0.0.0",
            "port": spec.serving.http_port,
            "request_timeout_s": spec.serving.request_timeout_seconds,
        },
        "grpc_options": {
            "port": spec.serving.grpc_port,
            "grpc_servicer_functions": list(GRPC_SERVICER_FUNCTIONS),
        },
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": APP_IMPORT_PATH,
                "args": args,
            }
        ],
    }


# ------------------------------------------------------------------------------------- RayService


def _security_context() -> dict[str, Any]:
    # Meets the "restricted" Pod Security Standard; Ray needs no privileges.
    return {
        "runAsNonRoot": True,
        "runAsUser": RAY_UID,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RAY_UID,
        "fsGroup": RAY_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _env(spec: MoEDeploymentSpec, plan: Plan, worker: bool) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "HF_HOME", "value": "/tmp/hf"},
        {"name": "RAY_SERVE_ENABLE_JSON_LOGGING", "value": "1"},
    ]
    if spec.model.token_secret_ref:
        ref = spec.model.token_secret_ref
        env.append(
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
        )
    if spec.serving.api_key_secret_ref:
        ref = spec.serving.api_key_secret_ref
        env.append(
            {
                "name": "MOE_API_KEY",
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
            }
        )
    if worker:
        env += [
            {"name": "VLLM_WORKER_MULTIPROC_METHOD", "value": "spawn"},
            # NCCL over the pod network by default; InfiniBand/RoCE clusters override via image.
            {"name": "NCCL_DEBUG", "value": "WARN"},
            {"name": "NCCL_CUMEM_ENABLE", "value": "0"},
        ]
        if plan.nodes_per_replica > 1:
            env.append(
                {"name": "VLLM_HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
            )
    return env


def _volumes(
    spec: MoEDeploymentSpec, worker: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    if worker:
        volumes.append(
            {
                "name": "dshm",
                "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shared_memory},
            }
        )
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
        source = spec.model.source
        if source.startswith("pvc://"):
            claim = source.removeprefix("pvc://").partition("/")[0]
            volumes.append(
                {"name": "models", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
            )
            mounts.append(
                {"name": "models", "mountPath": f"{MODELS_MOUNT}/{claim}", "readOnly": True}
            )
    return volumes, mounts


def _head_group(owner: Owner, spec: MoEDeploymentSpec, plan: Plan) -> dict[str, Any]:
    volumes, mounts = _volumes(spec, worker=False)
    ports = [
        {"name": "gcs", "containerPort": 6379},
        {"name": "dashboard", "containerPort": 8265},
        {"name": "client", "containerPort": 10001},
        {"name": SERVE_PORT_NAME, "containerPort": spec.serving.http_port},
        {"name": SERVE_GRPC_PORT_NAME, "containerPort": spec.serving.grpc_port},
    ]
    return {
        # num-gpus 0: the head runs the Serve controller and proxies, never an engine rank.
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"},
        "template": {
            "metadata": {"labels": labels_for(owner.name, "head")},
            "spec": {
                "securityContext": _pod_security_context(),
                "containers": [
                    {
                        "name": "ray-head",
                        "image": spec.image,
                        "ports": ports,
                        "env": _env(spec, plan, worker=False),
                        "resources": {
                            "requests": {"cpu": HEAD_CPU, "memory": HEAD_MEMORY},
                            "limits": {"cpu": HEAD_CPU, "memory": HEAD_MEMORY},
                        },
                        "securityContext": _security_context(),
                        "volumeMounts": mounts,
                    }
                ],
                "volumes": volumes,
            },
        },
    }


def _worker_group(owner: Owner, spec: MoEDeploymentSpec, plan: Plan) -> dict[str, Any]:
    accel = ACCELERATORS[spec.resources.accelerator]
    volumes, mounts = _volumes(spec, worker=True)
    gpus = str(plan.gpus_per_node)
    limits: dict[str, str] = {"cpu": spec.resources.cpu, "memory": spec.resources.memory}
    requests: dict[str, str] = dict(limits)
    if accel.k8s_resource:
        limits[accel.k8s_resource] = gpus
        requests[accel.k8s_resource] = gpus
    # Only the user's selector: a GPU product label is GPU Feature Discovery's (not a stated
    # prerequisite) and its value differs between SXM, PCIe and NVL parts of one GPU type.
    node_selector = dict(spec.resources.node_selector)
    pod_spec: dict[str, Any] = {
        "securityContext": _pod_security_context(),
        "containers": [
            {
                "name": "ray-worker",
                "image": spec.image,
                "env": _env(spec, plan, worker=True),
                "ports": [
                    {"name": "serve", "containerPort": spec.serving.http_port},
                    {"name": "grpc", "containerPort": spec.serving.grpc_port},
                ],
                "resources": {"requests": requests, "limits": limits},
                "securityContext": _security_context(),
                "volumeMounts": mounts,
            }
        ],
        "volumes": volumes,
    }
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    tolerations = [t.to_wire() for t in spec.resources.tolerations]
    if accel.k8s_resource and not tolerations:
        tolerations = [{"key": accel.k8s_resource, "operator": "Exists", "effect": "NoSchedule"}]
    if tolerations:
        pod_spec["tolerations"] = tolerations
    return {
        "groupName": "engine",
        # One group "replica" = one Serve replica's slice of numOfHosts pods.
        "replicas": plan.initial_replicas,
        "minReplicas": plan.min_replicas,
        "maxReplicas": plan.max_replicas,
        "numOfHosts": plan.nodes_per_replica,
        "rayStartParams": {},
        "template": {
            "metadata": {"labels": labels_for(owner.name, "engine")},
            "spec": pod_spec,
        },
    }


def ray_service(owner: Owner, spec: MoEDeploymentSpec, plan: Plan) -> dict[str, Any]:
    """The KubeRay RayService that runs the serving app."""
    serve = serve_config(owner, spec, plan)
    autoscale = plan.min_replicas != plan.max_replicas
    cluster: dict[str, Any] = {
        "rayVersion": spec.ray_version,
        # Ray 2.60 dashboards (the Serve REST API KubeRay deploys through) take token auth;
        # KubeRay makes the token Secret and presents it. No anonymous access to the dashboard.
        "authOptions": {"mode": "token"},
        "enableInTreeAutoscaling": autoscale,
        "headGroupSpec": _head_group(owner, spec, plan),
        "workerGroupSpecs": [_worker_group(owner, spec, plan)],
    }
    if autoscale:
        cluster["autoscalerOptions"] = {
            "upscalingMode": "Default",
            # Slices are slow to restart: keep idle ones as long as Serve's downscale delay.
            "idleTimeoutSeconds": int(max(spec.autoscaling.downscale_delay_seconds, 60)),
            "securityContext": _security_context(),
        }
    body: dict[str, Any] = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _metadata(owner, owner.name, "rayservice"),
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve, sort_keys=False),
            "rayClusterConfig": cluster,
            "serveService": serve_service(owner, spec),
        },
    }
    if spec.upgrade_strategy != "NewClusterWithIncrementalUpgrade":
        body["spec"]["upgradeStrategy"] = {"type": spec.upgrade_strategy}
    else:
        body["spec"]["upgradeStrategy"] = {
            "type": spec.upgrade_strategy,
            "clusterUpgradeOptions": {
                "gatewayClassName": spec.gateway_class_name,
                "stepSizePercent": 25,
                "intervalSeconds": 60,
                "maxSurgePercent": 100,
            },
        }
    return body


# ------------------------------------------------------------------------------- other children


def serve_service(owner: Owner, spec: MoEDeploymentSpec) -> dict[str, Any]:
    """RayService.spec.serveService: KubeRay keeps the selector (`ray.io/cluster` of the serving
    cluster + `ray.io/serve=true`) and the name; our labels and the ports' appProtocol stay."""
    labels = labels_for(owner.name, "serve")
    # KubeRay manages this Service (its owner is the RayService), not this operator.
    labels.pop(LABEL_MANAGED_BY)
    return {
        "metadata": {"name": serve_service_name(owner.name), "labels": labels},
        "spec": {
            "type": "ClusterIP",
            "ports": [
                {
                    "name": SERVE_PORT_NAME,
                    "port": spec.serving.http_port,
                    "targetPort": spec.serving.http_port,
                    "protocol": "TCP",
                    "appProtocol": "http",
                },
                {
                    "name": SERVE_GRPC_PORT_NAME,
                    "port": spec.serving.grpc_port,
                    "targetPort": spec.serving.grpc_port,
                    "protocol": "TCP",
                    # HTTP/2 without TLS (gRPC), the standard value (KEP-3726).
                    "appProtocol": "kubernetes.io/h2c",
                },
            ],
        },
    }


def _service(owner: Owner, suffix: str, port: int, protocol_name: str) -> dict[str, Any]:
    # A DNS alias of KubeRay's serve Service rather than a selector of our own: a selector on
    # ray.io/serve=true matches the proxies of both clusters during a NewCluster upgrade, while
    # KubeRay pins its Service to the serving cluster and switches it atomically.
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, f"{owner.name}-{suffix}", suffix),
        "spec": {
            "type": "ExternalName",
            "externalName": (
                f"{serve_service_name(owner.name)}.{owner.namespace}.svc.{CLUSTER_DOMAIN}"
            ),
            "ports": [
                {
                    "name": protocol_name,
                    "port": port,
                    "protocol": "TCP",
                    "appProtocol": "kubernetes.io/h2c" if protocol_name == "grpc" else "http",
                }
            ],
        },
    }


def engine_min_available(plan: Plan) -> int:
    """The PodDisruptionBudget's minAvailable: all engine pods of the replica floor but one.

    The disruption controller counts pods, not slices, and one evicted pod stops its whole
    multi-host slice; allowing one pod at a time (at the floor) takes down at most one replica
    per eviction, and the next eviction waits until KubeRay's replacement pod is Ready. Above
    the floor (autoscaled up), the extra pods may go too. An integer minAvailable because the
    controller needs the owner's /scale for maxUnavailable or a percentage, and a RayCluster
    has none (pkg/controller/disruption/disruption.go, getExpectedPodCount).
    """
    return max(plan.min_replicas * plan.nodes_per_replica - 1, 0)


def pod_disruption_budget(owner: Owner, plan: Plan) -> dict[str, Any]:
    """Voluntary evictions (node drains) of engine pods, one at a time at the replica floor."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(owner, f"{owner.name}-workers", "pdb"),
        "spec": {
            "minAvailable": engine_min_available(plan),
            "selector": {"matchLabels": {LABEL_DEPLOYMENT: owner.name, LABEL_COMPONENT: "engine"}},
            # A pod that is not Ready (e.g. of a slice that already broke) may always be
            # evicted, so a broken slice never blocks a drain.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def network_policy(owner: Owner, spec: MoEDeploymentSpec) -> dict[str, Any]:
    """Inference ports open to clients; Ray's ports only within the cluster; no dashboard."""
    np = spec.network_policy
    client_from: dict[str, Any] = (
        {"podSelector": {"matchLabels": dict(np.allowed_client_labels)}}
        if np.allowed_client_labels
        else {"podSelector": {}}
    )
    own = {"podSelector": {"matchLabels": {LABEL_DEPLOYMENT: owner.name}}}
    http_only = [{"protocol": "TCP", "port": spec.serving.http_port}]
    # The operator's live status (GET /v1/moe/state) and Prometheus (/metrics) use the HTTP
    # port from their own namespaces.
    monitors: list[dict[str, Any]] = [
        {"from": [_namespace_peer(np.operator_namespace)], "ports": http_only}
    ]
    if np.prometheus_namespace:
        monitors.append(
            {
                "from": [_namespace_peer(np.prometheus_namespace, np.prometheus_pod_labels)],
                "ports": http_only,
            }
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(owner, owner.name, "networkpolicy"),
        "spec": {
            "podSelector": {"matchLabels": {LABEL_DEPLOYMENT: owner.name}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [client_from],
                    "ports": [
                        {"protocol": "TCP", "port": spec.serving.http_port},
                        {"protocol": "TCP", "port": spec.serving.grpc_port},
                    ],
                },
                # Ray's own traffic (GCS, object store, NCCL) stays inside the RayCluster.
                {"from": [own]},
                # KubeRay's operator submits the Serve config to the dashboard (8265) and probes
                # the Serve proxy; it runs in another namespace.
                {
                    "from": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": np.kuberay_namespace}
                            }
                        }
                    ],
                    "ports": [
                        {"protocol": "TCP", "port": 8265},
                        {"protocol": "TCP", "port": spec.serving.http_port},
                    ],
                },
                *monitors,
            ],
        },
    }


def _namespace_peer(namespace: str, pod_labels: dict[str, str] | None = None) -> dict[str, Any]:
    peer: dict[str, Any] = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
    }
    if pod_labels:
        peer["podSelector"] = {"matchLabels": dict(pod_labels)}
    return peer


def check_renderable(spec: MoEDeploymentSpec) -> None:
    """Cluster-only constraints the schema cannot express. Raises RenderError."""
    if spec.model.is_local:
        raise RenderError(
            f"spec.model.source {spec.model.source!r} is a local path: it only works with "
            "`moectl up`; in a cluster use hf://, s3:// or pvc://"
        )
    if spec.resources.accelerator == "CPU":
        raise RenderError(
            "spec.resources.accelerator CPU is for local runs (`moectl up`); pick a GPU type"
        )


def render(owner: Owner, spec: MoEDeploymentSpec, plan: Plan) -> list[dict[str, Any]]:
    """All children of the MoEDeployment, in apply order."""
    check_renderable(spec)
    objects = [ray_service(owner, spec, plan)]
    if spec.upgrade_strategy != INCREMENTAL:  # no <name>-serve-svc to alias (module docstring)
        objects += [
            _service(owner, "http", spec.serving.http_port, "http"),
            _service(owner, "grpc", spec.serving.grpc_port, "grpc"),
        ]
    objects.append(pod_disruption_budget(owner, plan))
    if spec.network_policy.enabled:
        objects.append(network_policy(owner, spec))
    return objects


def endpoints(owner: Owner, spec: MoEDeploymentSpec) -> dict[str, str]:
    """In-cluster addresses of the Services (under an incremental upgrade strategy, the
    Gateway KubeRay makes instead: HTTP only)."""
    if spec.upgrade_strategy == INCREMENTAL:
        return {"gateway": f"{owner.namespace}/{gateway_name(owner.name)}:{GATEWAY_HTTP_PORT}"}
    base = f"{owner.namespace}.svc"
    return {
        "http": f"http://{owner.name}-http.{base}:{spec.serving.http_port}/v1",
        "grpc": f"{owner.name}-grpc.{base}:{spec.serving.grpc_port}",
    }
