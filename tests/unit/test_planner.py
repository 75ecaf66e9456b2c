"""The planner: layouts for the catalog models, expert placement, and errors that say what to do."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from unit_support import CLUSTER_EXAMPLES, load

from moe_operator.api import MoEDeploymentSpec
from moe_operator.catalog import ARCHITECTURES, from_hf_config, lookup
from moe_operator.planner import PlanningError, plan


def spec(**overrides: Any) -> MoEDeploymentSpec:
    base: dict[str, Any] = {"model": {"name": "m", "source": "hf://google/gemma-4-26B-A4B-it"}}
    for key, value in overrides.items():
        base[key] = value
    return MoEDeploymentSpec.model_validate(base)


EXPECTED = {
    # example file -> (EP, TP, DP, GPUs per replica, nodes, experts per rank)
    "gemma4-26b-a4b-a100-80gb.yaml": (2, 2, 1, 2, 1, 64),
    "mixtral-8x7b-2xa100-40gb.yaml": (2, 2, 1, 2, 1, 4),
    "deepseek-v3-4x8xa100-80gb.yaml": (32, 1, 32, 32, 4, 9),
}


@pytest.mark.parametrize("path", CLUSTER_EXAMPLES, ids=lambda p: p.name)
def test_examples_plan(path: Any) -> None:
    p = plan(MoEDeploymentSpec.model_validate(load(path)["spec"]))
    got = (
        p.expert_parallel_size,
        p.tensor_parallel_size,
        p.data_parallel_size,
        p.gpus_per_replica,
        p.nodes_per_replica,
        p.experts_per_rank,
    )
    assert got == EXPECTED[path.name]
    assert p.max_full_length_sequences >= 1
    assert p.weights_gib_per_gpu + p.kv_cache_gib_per_gpu <= 80


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_every_expert_is_placed_exactly_once(tp: int) -> None:
    p = plan(spec(parallelism={"tensorParallelSize": tp}))
    held = sorted(e for r in p.placement for e in r.experts)
    assert held == list(range(128))  # each expert on exactly one rank
    assert all(len(r.experts) == 128 // tp for r in p.placement)
    assert [r.rank for r in p.placement] == list(range(tp))


def test_redundant_experts_make_an_odd_ep_size_fit() -> None:
    # 128 experts over EP6 does not divide; 4 redundant experts make 132 = 6 x 22.
    with pytest.raises(PlanningError, match=r"EP6 does not divide 128 experts"):
        plan(
            spec(
                parallelism={"tensorParallelSize": 2, "dataParallelSize": 3},
                resources={"gpusPerNode": 6},
            )
        )
    p = plan(
        spec(
            parallelism={
                "tensorParallelSize": 2,
                "dataParallelSize": 3,
                "eplb": {"enabled": True, "redundantExperts": 4},
            },
            resources={"gpusPerNode": 6},
        )
    )
    assert (p.expert_parallel_size, p.experts_per_rank, p.redundant_experts) == (6, 22, 4)
    slots = [e for r in p.placement for e in r.experts]
    assert len(slots) == 132 and set(slots) == set(range(128))


def test_spans_nodes_when_one_node_is_too_small() -> None:
    p = plan(
        spec(
            model={"name": "q", "source": "hf://Qwen/Qwen3-235B-A22B"},
            resources={"accelerator": "A100-40GB", "gpusPerNode": 4},
        )
    )
    assert p.nodes_per_replica > 1
    assert p.gpus_per_replica == 4 * p.nodes_per_replica
    assert {r.node for r in p.placement} == set(range(p.nodes_per_replica))


def test_too_big_says_what_to_change() -> None:
    with pytest.raises(PlanningError) as info:
        plan(
            spec(
                model={"name": "d", "source": "hf://deepseek-ai/DeepSeek-V3"},
                resources={"accelerator": "A100-40GB", "maxNodesPerReplica": 1},
            )
        )
    message = str(info.value)
    assert "does not fit" in message
    assert "maxNodesPerReplica" in message and "quantization: fp8" in message


def test_context_beyond_the_model_is_refused() -> None:
    with pytest.raises(PlanningError, match=r"exceeds mixtral-8x7b's context limit of 32768"):
        plan(
            spec(
                model={
                    "name": "m",
                    "source": "hf://mistralai/Mixtral-8x7B-v0.1",
                    "maxModelLen": 65536,
                }
            )
        )


def test_tp_beyond_a_node_is_refused() -> None:
    with pytest.raises(PlanningError, match=r"exceeds resources\.gpusPerNode 8"):
        plan(spec(parallelism={"tensorParallelSize": 16}))


def test_unknown_architecture_lists_the_catalog() -> None:
    with pytest.raises(PlanningError, match=r"set spec\.model\.architecture to one of"):
        plan(spec(model={"name": "x", "source": "hf://someone/unknown-moe"}))


def test_cpu_plans_data_parallel_only_when_asked() -> None:
    """DP + EP runs on the CPU with the project's vLLM plugin (cpu_comm_fix), one DP rank per
    node of a local multi-node cluster; an automatic CPU plan still keeps DP at 1."""
    cpu = {"name": "t", "source": "hf://google/gemma-4-26B-A4B-it", "maxModelLen": 1024}
    asked = plan(
        spec(
            model=cpu,
            resources={
                "accelerator": "CPU",
                "gpusPerNode": 1,
                "maxNodesPerReplica": 2,
                "memory": "512Gi",
            },
            parallelism={"tensorParallelSize": 1, "dataParallelSize": 2},
        )
    )
    assert (asked.data_parallel_size, asked.expert_parallel_size) == (2, 2)
    assert (asked.nodes_per_replica, asked.gpus_per_node) == (2, 1)
    assert [p.node for p in asked.placement] == [0, 1]
    auto = plan(
        spec(
            model=cpu,
            resources={"accelerator": "CPU", "gpusPerNode": 2, "memory": "512Gi"},
            parallelism={"tensorParallelSize": 1},
        )
    )
    assert auto.data_parallel_size == 1


def test_expert_parallel_off_shards_experts_with_tp() -> None:
    p = plan(spec(parallelism={"expertParallel": False, "tensorParallelSize": 2}))
    assert p.expert_parallel_size == 1
    assert all(r.experts == list(range(128)) for r in p.placement)
    assert any("expert parallelism off" in n for n in p.notes)


def test_gemma_catalog_entry_documents_its_routing_choice() -> None:
    gemma = lookup("google/gemma-4-26B-A4B-it")
    assert gemma is not None and gemma.experts_per_token == 8 and gemma.num_experts == 128
    assert "top-8" in gemma.notes
    # Top-8 is what makes "A4B": ~3.8B active parameters.
    per_token_experts = gemma.expert_params * 8 / 128
    assert 1.2e9 < per_token_experts < 1.6e9
    assert 3.5e9 < gemma.active_params < 4.1e9
    assert 24e9 < gemma.expert_params + 1.5e9 < 27e9


def test_every_catalog_entry_has_a_source_and_consistent_sizes() -> None:
    for arch in ARCHITECTURES.values():
        assert arch.source
        assert arch.expert_params < arch.total_params, arch.key
        assert arch.active_params < arch.total_params, arch.key


def test_from_hf_config_reads_a_moe_checkpoint() -> None:
    cfg = {
        "model_type": "qwen3_moe",
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "vocab_size": 1024,
        "max_position_embeddings": 2048,
    }
    arch = from_hf_config(cfg)
    assert (arch.num_experts, arch.experts_per_token, arch.family) == (8, 2, "qwen3_moe")
    assert arch.tool_call_parser == "hermes"
    with pytest.raises(ValueError, match="no mixture-of-experts"):
        from_hf_config({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1})


def test_decode_roofline_and_cost() -> None:
    from moe_operator.catalog import ACCELERATORS
    from moe_operator.throughput import cost_per_million_tokens, decode_roofline

    gemma = lookup("gemma-4-26b-a4b")
    assert gemma is not None
    a100 = ACCELERATORS["A100-80GB"]
    common = dict(
        tp=2,
        dp=1,
        ep=2,
        pp=1,
        experts_per_rank=64,
        bytes_per_param=2.0,
        kv_bytes_per_token_per_gpu=0.0,
    )
    one = decode_roofline(gemma, a100, batch=1, **common)  # type: ignore[arg-type]
    many = decode_roofline(gemma, a100, batch=64, **common)  # type: ignore[arg-type]
    # One token touches top-8 of 128 experts; 64 tokens touch nearly all of them.
    assert one.touched_expert_fraction == pytest.approx(8 / 128)
    assert many.touched_expert_fraction > 0.98
    # Batching amortises the weight reads: much more than 1x but less than 64x the throughput.
    assert 5 < many.output_tokens_per_s / one.output_tokens_per_s < 64
    # Single-stream decode reads dense + 1/16 of the rank's experts per step.
    expected_bytes = gemma.dense_params * 2 / 2 + gemma.expert_params / 2 * 2 * (8 / 128)
    assert one.bytes_per_step_per_gpu == pytest.approx(expected_bytes)
    assert cost_per_million_tokens(3600.0, 1000.0) == pytest.approx(1000.0)
    assert cost_per_million_tokens(1.0, 0.0) is None


def test_plan_reports_cost_with_its_assumption() -> None:
    p = plan(spec(pricing={"hourlyPricePerGpu": 2.0}, parallelism={"tensorParallelSize": 2}))
    assert p.hourly_cost_per_replica == 4.0
    assert "roofline" in p.throughput_assumption
    assert p.cost_per_million_output_tokens == pytest.approx(
        4.0 / (p.assumed_output_tokens_per_s * 3600) * 1e6, rel=1e-3
    )


def test_tp_that_does_not_divide_the_heads_names_the_field_and_rule() -> None:
    # Before: "does not fit ... ()" and advice to add GPUs.
    with pytest.raises(PlanningError) as info:
        plan(spec(parallelism={"tensorParallelSize": 3}))
    message = str(info.value)
    assert "spec.parallelism.tensorParallelSize 3 does not divide" in message
    assert "attention heads" in message and "does not fit" not in message


SIZES = st.one_of(st.just("auto"), st.integers(min_value=1, max_value=16))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arch=st.sampled_from(sorted(ARCHITECTURES)),
    tp=SIZES,
    dp=SIZES,
    gpus_per_node=st.sampled_from([1, 2, 4, 6, 8]),
    max_nodes=st.integers(min_value=1, max_value=8),
    redundant=st.sampled_from([0, 0, 2, 4]),
    accelerator=st.sampled_from(["A100-80GB", "H200-141GB", "L40S-48GB"]),
)
def test_explicit_sizes_plan_or_name_the_broken_rule(
    arch: str,
    tp: Any,
    dp: Any,
    gpus_per_node: int,
    max_nodes: int,
    redundant: int,
    accelerator: str,
) -> None:
    """Explicit TP / DP either give a plan that uses them, or an error that names the field and
    its rule (heads % TP, experts % EP with EP = TP x DP, placeable replica sizes); never an
    empty list of tried layouts."""
    entry = ARCHITECTURES[arch]
    try:
        s = spec(
            model={"name": "m", "source": "hf://x/y", "architecture": arch, "quantization": "fp8"},
            parallelism={
                "tensorParallelSize": tp,
                "dataParallelSize": dp,
                "eplb": {"enabled": redundant > 0, "redundantExperts": redundant},
            },
            resources={
                "accelerator": accelerator,
                "gpusPerNode": gpus_per_node,
                "maxNodesPerReplica": max_nodes,
            },
        )
    except ValidationError:
        return  # e.g. TP beyond gpusPerNode bounds of the model: not the planner's business
    slots = entry.num_experts + redundant
    try:
        p = plan(s)
    except PlanningError as err:
        message = str(err)
        assert "()" not in message, message
        assert "spec." in message or "resources." in message, message
        if tp != "auto" and tp <= gpus_per_node and entry.num_attention_heads % tp:
            assert "tensorParallelSize" in message and "attention heads" in message, message
        elif (
            tp != "auto"
            and dp != "auto"
            and tp <= gpus_per_node
            and tp * dp > 1
            and slots % (tp * dp)
        ):
            assert "dataParallelSize" in message and "experts" in message, message
            assert "does not fit" not in message, message
        return
    if tp != "auto":
        assert p.tensor_parallel_size == tp
    if dp != "auto":
        assert p.data_parallel_size == dp
    assert entry.num_attention_heads % p.tensor_parallel_size == 0
    if p.expert_parallel_size > 1:
        assert (entry.num_experts + p.redundant_experts) % p.expert_parallel_size == 0
