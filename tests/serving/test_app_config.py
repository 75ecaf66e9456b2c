"""From `AppConfig` to vLLM arguments, Ray resources and proxy options (no engine started)."""

from __future__ import annotations

from typing import Any

import pytest

from moe_serving.app import (
    build_app,
    engine_bundles,
    engine_deployment_options,
    ingress_deployment_options,
    initial_replicas,
)
from moe_serving.config import GRPC_SERVICER_FUNCTIONS, AppConfig
from moe_serving.local import serve_options
from moe_serving.vllm_args import (
    EngineArgsError,
    build_namespace,
    cpu_thread_binding,
    engine_kwargs,
    world_size,
)


def _config(**engine: Any) -> AppConfig:
    return AppConfig.model_validate(
        {"engine": {"model": "/models/tiny", "served_model_name": "tiny", **engine}}
    )


def test_engine_kwargs_map_parallelism_and_eplb() -> None:
    config = _config(
        tensor_parallel_size=2,
        enable_expert_parallel=True,
        all2all_backend="allgather_reducescatter",
        eplb={"enabled": True, "num_redundant_experts": 2, "window_size": 10, "step_interval": 20},
        extra={"max_num_seqs": 8},
    )
    kwargs = engine_kwargs(config.engine)
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["enable_expert_parallel"] is True
    assert kwargs["served_model_name"] == ["tiny"]
    assert kwargs["distributed_executor_backend"] == "mp"
    assert kwargs["all2all_backend"] == "allgather_reducescatter"
    assert kwargs["enable_eplb"] is True
    assert kwargs["eplb_config"] == {
        "num_redundant_experts": 2,
        "window_size": 10,
        "step_interval": 20,
    }
    assert kwargs["max_num_seqs"] == 8
    assert "revision" not in kwargs  # None values stay vLLM's defaults


def test_namespace_is_vllms_own_and_rejects_unknown_extras() -> None:
    args = build_namespace(_config(tool_call_parser="hermes", reasoning_parser="qwen3").engine)
    assert args.model == "/models/tiny" and args.served_model_name == ["tiny"]
    assert args.tool_call_parser == "hermes" and args.enable_auto_tool_choice is True
    assert args.structured_outputs_config.reasoning_parser == "qwen3"
    with pytest.raises(EngineArgsError, match="'no_such_flag' is not a vLLM engine"):
        build_namespace(_config(extra={"no_such_flag": 1}).engine)


def test_parsers_without_constrained_required_and_named_get_a_json_forced_variant() -> None:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.tool_parsers import ToolParserManager

    from moe_serving.tool_choice import SUFFIX

    # hermes constrains through its structural tag: kept as it is.
    assert build_namespace(_config(tool_call_parser="hermes").engine).tool_call_parser == "hermes"
    # gemma4 (and mistral) leave required/named unconstrained in vLLM 0.32: the variant does not.
    args = build_namespace(_config(tool_call_parser="gemma4").engine)
    assert args.tool_call_parser == "gemma4" + SUFFIX
    variant = ToolParserManager.get_tool_parser(args.tool_call_parser)
    base = ToolParserManager.get_tool_parser("gemma4")
    assert issubclass(variant, base) and variant.supports_required_and_named
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    parser = object.__new__(variant)  # adjust_request needs no tokenizer state
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        request = ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": "x"}], "tools": [tool], "tool_choice": choice}
        )
        adjusted = parser.adjust_request(request)
        assert adjusted.structured_outputs is not None and adjusted.structured_outputs.json
        assert "city" in str(adjusted.structured_outputs.json)


def test_cpu_thread_binding_gives_each_rank_its_cores() -> None:
    assert cpu_thread_binding(2, [0, 1]) == "0|1"
    assert cpu_thread_binding(2, [3, 2, 1, 0]) == "0,1|2,3"
    with pytest.raises(EngineArgsError, match="need at least 4 CPUs"):
        cpu_thread_binding(4, [0, 1])


def test_bundles_hold_the_ranks_of_one_engine_and_dp_ranks_are_a_gang() -> None:
    """With DP > 1 each DP rank is its own Serve replica (one vLLM engine, its TP x PP
    bundles) and the DP group is a Serve gang, as Ray Serve LLM's DPServer deploys it
    (ray/llm/_internal/serve/serving_patterns/data_parallel/dp_server.py,
    `get_deployment_options`): replica counts are multiplied by DP, the per-replica
    placement strategy is dropped (Serve refuses it beside a gang)."""
    config = AppConfig.model_validate(
        {
            "engine": {
                "model": "m",
                "served_model_name": "m",
                "tensor_parallel_size": 2,
                "data_parallel_size": 2,
            },
            "resources": {"num_cpus_per_rank": 1, "num_gpus_per_rank": 1, "accelerator_type": "L4"},
            "autoscaling": {"min_replicas": 2, "max_replicas": 4},
        }
    )
    assert world_size(config.engine) == 4
    assert engine_bundles(config) == [{"CPU": 1, "GPU": 1, "accelerator_type:L4": 0.001}] * 2
    assert initial_replicas(config) == 2
    opts = engine_deployment_options(config)
    gang = opts["gang_scheduling_config"]
    assert (gang.gang_size, gang.gang_placement_strategy, gang.runtime_failure_policy) == (
        2,
        "PACK",
        "RESTART_GANG",
    )
    assert "placement_group_strategy" not in opts
    auto = opts["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["initial_replicas"]) == (4, 8, 4)
    assert auto["policy"].policy_kwargs["gang_size"] == 2
    # Serve itself accepts these options (its DeploymentConfig validates gang vs counts).
    from ray import serve

    serve.deployment(**opts)(type("E", (), {}))
    fixed = AppConfig.model_validate(
        {**config.model_dump(), "autoscaling": {"min_replicas": 3, "max_replicas": 3}}
    )
    assert engine_deployment_options(fixed)["num_replicas"] == 6


def test_dp_rank_config_gives_vllm_its_rank_and_bundles() -> None:
    from moe_serving.app import with_dp_rank
    from moe_serving.dp_group import DPRank

    config = _config(tensor_parallel_size=2, data_parallel_size=2, enable_expert_parallel=True)
    rank = DPRank(1, 2, "g1", "10.0.0.5", 4242, "n0", "pg", (2, 3))
    ranked = with_dp_rank(config, rank)
    assert ranked.engine.extra == {
        "data_parallel_rank": 1,
        "data_parallel_address": "10.0.0.5",
        "data_parallel_rpc_port": 4242,
    }
    assert ranked.engine.env["VLLM_RAY_BUNDLE_INDICES"] == "2,3"
    # vLLM's own parser knows these arguments: rank 1 of 2 is vLLM's external-LB DP mode.
    args = build_namespace(ranked.engine)
    assert (args.data_parallel_rank, args.data_parallel_size) == (1, 2)


def test_serve_options_name_the_grpc_servicer() -> None:
    options = serve_options(8000, 9000)
    assert options["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert options["grpc_options"] == {
        "port": 9000,
        "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS,
    }
    # The servicer functions must be importable where the proxies run.
    for function in GRPC_SERVICER_FUNCTIONS:
        module, _, name = function.rpartition(".")
        imported = __import__(module, fromlist=[name])
        assert callable(getattr(imported, name))


def test_servicer_registers_every_rpc_and_leaves_parsing_to_the_ingress() -> None:
    import grpc

    from moe_serving.grpc_servicer import UndecodableRequest, add_InferenceServiceServicer_to_server
    from moe_serving.grpc_servicer import decode as decode_request
    from moe_serving.proto import inference_pb2 as pb
    from moe_serving.proto import inference_pb2_grpc as generated

    class Capture:
        def __init__(self) -> None:
            self.handlers: dict[str, grpc.RpcMethodHandler] = {}

        def add_generic_rpc_handlers(self, generic: Any) -> None:
            self.handlers.update(generic[0]._method_handlers)

        def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
            pass

    class Stub:
        def __getattr__(self, name: str) -> Any:
            return lambda *args: None

    from grpc_health.v1 import health_pb2_grpc

    from moe_serving.grpc_servicer import add_HealthServicer_to_server

    ours, theirs = Capture(), Capture()
    add_InferenceServiceServicer_to_server(Stub(), ours)
    generated.add_InferenceServiceServicer_to_server(Stub(), theirs)
    # The standard health service, against grpcio-health-checking's own registration.
    add_HealthServicer_to_server(Stub(), ours)
    health_pb2_grpc.add_HealthServicer_to_server(Stub(), theirs)
    assert ours.handlers.keys() == theirs.handlers.keys()  # every RPC of the proto
    for key, handler in ours.handlers.items():
        other = theirs.handlers[key]
        assert handler.request_deserializer is None  # bytes reach the ingress
        assert handler.response_serializer == other.response_serializer
        assert handler.response_streaming == other.response_streaming
    message = pb.CompleteRequest(prompt="hi")
    assert decode_request(message.SerializeToString(), pb.CompleteRequest) == message
    assert decode_request(message, pb.CompleteRequest) is message
    for garbage in (b"\xff\xff\xff\x0f garbage", b"\x12\x10abc"):
        with pytest.raises(UndecodableRequest, match=r"not a valid moe\.inference\.v1\.Complete"):
            decode_request(garbage, pb.CompleteRequest)


def test_deployment_options_fit_a_two_core_machine() -> None:
    from ray import serve

    config = _config(tensor_parallel_size=2, enable_expert_parallel=True)
    engine = engine_deployment_options(config)
    ingress = ingress_deployment_options(config)
    # No CPU, on the head node: Ray gives the head this resource (ray/_common/constants.py
    # HEAD_NODE_RESOURCE_NAME; Ray Train pins its state actor the same way); a local
    # cluster's head has it too (tests/multinode).
    from ray._common.constants import HEAD_NODE_RESOURCE_NAME

    assert ingress["ray_actor_options"] == {
        "num_cpus": 0,
        "resources": {HEAD_NODE_RESOURCE_NAME: 0.001},
    }
    # An old ingress drains every request it holds during a rolling update (none force-killed).
    assert ingress["graceful_shutdown_timeout_s"] > config.request_timeout_s
    assert engine["ray_actor_options"] == {"num_cpus": 0}
    assert engine["placement_group_bundles"] == [{"CPU": 1.0}, {"CPU": 1.0}]
    # Ray must hand queued requests to the replica, whose own queue answers 503.
    assert engine["max_ongoing_requests"] > config.max_ongoing_requests + config.max_queued_requests
    assert isinstance(build_app(config.model_dump(mode="json")), serve.Application)


def test_build_app_rejects_bad_args_with_a_message() -> None:
    with pytest.raises(ValueError, match="served_model_name"):
        build_app({"engine": {"model": "m"}})
