"""The Ray Serve application: `build_app(args)` -> an engine deployment behind an ingress.

    HTTP :8000 (OpenAI API) ─┐
                              ├─> Ingress (0 CPUs) ──handle──> LLMEngine (vLLM, TP/EP ranks)
    gRPC :9000 (proxy) ──────┘

* `LLMEngine` (`moe_serving.replica`) runs one vLLM engine per replica
  (`moe_serving.engine.EngineServer`: vLLM's async engine and vLLM's own OpenAI serving layer,
  see that module for why). Its placement group holds one bundle per engine rank (TP x PP), so a
  replica's ranks are reserved together; the replica actor itself takes no CPU and sits in the
  first bundle. With the default `mp` executor the ranks are local processes using those
  reserved CPUs; with `ray` vLLM places its rank actors into the bundles.
* `Ingress` (`moe_serving.ingress`) is the FastAPI app for HTTP and the target of Ray Serve's
  gRPC proxy. It checks auth and the model name, applies the request deadline, maps engine
  outcomes (`moe_serving.protocol`) to HTTP statuses / gRPC codes (`moe_serving.outcomes`),
  and cancels the engine request when the client goes away.

This module builds the application and holds the deployments' Ray Serve options. Both
deployments are bound to the typed `AppConfig` (Ray pickles it to their replicas): from a serve
config it is parsed once, here, from `args`.

Operator contract: `import_path: moe_serving.app:build_app`, `args: AppConfig.model_dump(
mode="json")`, gRPC servicer function
`moe_serving.grpc_servicer.add_InferenceServiceServicer_to_server` (requests reach the
ingress as bytes and are parsed there: see that module).
"""

from __future__ import annotations

from typing import Any

from ray import serve

from moe_serving import autoscaling
from moe_serving.config import ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT, AppConfig
from moe_serving.ingress import Ingress
from moe_serving.replica import LLMEngine, with_dp_rank
from moe_serving.vllm_args import ranks_per_engine

__all__ = [
    "ENGINE_DEPLOYMENT",
    "INGRESS_DEPLOYMENT",
    "Ingress",
    "LLMEngine",
    "build",
    "build_app",
    "engine_bundles",
    "engine_deployment_options",
    "ingress_deployment_options",
    "initial_replicas",
    "with_dp_rank",
]

# Calls besides generation (health, metrics, models) must never be refused by Ray's limit.
_CONTROL_HEADROOM = 16


def engine_bundles(config: AppConfig) -> list[dict[str, float]]:
    """Placement-group bundles of one engine Serve replica: one per rank it runs (TP x PP), all
    reserved at once. With DP > 1 each DP rank is its own Serve replica (`dp_group`), so DP
    does not multiply the bundles here: the gang's placement group concatenates them."""
    res = config.resources
    bundle: dict[str, float] = {"CPU": res.num_cpus_per_rank}
    if res.num_gpus_per_rank:
        bundle["GPU"] = res.num_gpus_per_rank
    if res.accelerator_type:
        bundle[f"accelerator_type:{res.accelerator_type}"] = 0.001
    return [dict(bundle) for _ in range(ranks_per_engine(config.engine))]


def initial_replicas(config: AppConfig) -> int:
    scaling = config.autoscaling
    if scaling.initial_replicas is not None:
        return max(scaling.initial_replicas, 1)
    return max(scaling.min_replicas, 1)


def engine_deployment_options(config: AppConfig) -> dict[str, Any]:
    """Ray Serve options of the engine deployment: one Serve replica = one vLLM engine with its
    TP x PP ranks; with DP > 1, one gang of DP such replicas is one MoEDeployment replica."""
    dp = config.engine.data_parallel_size
    placement: dict[str, Any] = {
        "placement_group_bundles": engine_bundles(config),
        "placement_group_strategy": config.resources.placement_strategy,
    }
    if dp > 1:
        from ray.serve.config import GangSchedulingConfig

        # Serve refuses a per-replica strategy beside a gang; the gang packs its bundles.
        placement = {
            "placement_group_bundles": engine_bundles(config),
            "gang_scheduling_config": GangSchedulingConfig(
                gang_size=dp,
                gang_placement_strategy="PACK",
                # A DP group that lost a rank cannot step its MoE layers: restart all of it.
                runtime_failure_policy="RESTART_GANG",
            ),
        }
    if config.prefix_affinity:
        from ray.serve.config import RequestRouterConfig

        router: dict[str, Any] = {
            "request_router_class": "moe_serving.routing:PrefixAffinityRouter",
            # Affinity yields to load when the chosen replica waits on more than a queue's worth.
            "request_router_kwargs": {"imbalance_threshold": max(config.max_ongoing_requests, 1)},
        }
        placement["request_router_config"] = RequestRouterConfig(**router)
    return {
        "name": ENGINE_DEPLOYMENT,
        # A fixed count, or replicas following queue depth (moe_serving.autoscaling), counted
        # in Serve replicas: DP of them per MoEDeployment replica.
        **autoscaling.replica_count_options(
            config.autoscaling, config.max_ongoing_requests, gang_size=dp
        ),
        # The replica actor holds no rank itself: it sits in its first bundle, free.
        "ray_actor_options": {"num_cpus": 0},
        **placement,
        # Our admission queue decides about 503s; Ray must deliver queued requests to it.
        "max_ongoing_requests": (
            config.max_ongoing_requests + config.max_queued_requests + _CONTROL_HEADROOM
        ),
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
        # On shutdown Serve stops routing, waits for in-flight requests, then calls __del__.
        "graceful_shutdown_wait_loop_s": 2,
        "graceful_shutdown_timeout_s": min(config.request_timeout_s, 120),
    }


def ingress_deployment_options(config: AppConfig) -> dict[str, Any]:
    """Ray Serve options of the ingress: no CPU (it only forwards), never the bottleneck."""
    return {
        "name": INGRESS_DEPLOYMENT,
        "num_replicas": 1,
        # On the head node (Ray's `node:__internal_head__` resource), beside Serve's controller:
        # it lives as long as the cluster. On a worker node it would die with that node and cut
        # every request in flight through it, on every replica, without an answer.
        "ray_actor_options": {"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}},
        "max_ongoing_requests": 10_000,
        # A rolling update replaces the ingress and the engine together: the old ingress may
        # hold requests waiting for the new engine replica to come up. It bounds every request
        # by request_timeout_s, so letting it drain that long loses none (Serve's default 20 s
        # force-killed such requests: a 500 from the proxy). It takes no CPU while it waits.
        "graceful_shutdown_wait_loop_s": 2,
        "graceful_shutdown_timeout_s": config.request_timeout_s + 10,
    }


def build(config: AppConfig, engine_cls: type = LLMEngine) -> serve.Application:
    """The application with `engine_cls` as its engine deployment (LLMEngine, or a stand-in
    with the same constructor and methods in placement tests): same options, same ingress.
    Both deployments get `config` itself (typed; Ray pickles it to their replicas)."""
    engine = serve.deployment(**engine_deployment_options(config))(engine_cls).bind(config)
    return serve.deployment(**ingress_deployment_options(config))(Ingress).bind(engine, config)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Ray Serve application for the operator's `serveConfigV2`: `args` (`AppConfig` JSON, a
    dict from the serve config's YAML) is parsed here, once."""
    return build(AppConfig.model_validate(args))
