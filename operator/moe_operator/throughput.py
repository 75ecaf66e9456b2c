"""Decode throughput bound and cost per million output tokens (pure arithmetic).

Decoding is memory-bound: every step each GPU streams its share of the weights the step touches
(and the KV cache) from HBM. For a batch of B sequences per attention-DP rank, each token routes
to k of E experts, so a MoE layer touches E * (1 - (1 - k/E)^(B*DP)) distinct experts on average.
Per GPU and step:

    bytes = dense_bytes / TP + expert_bytes_per_rank * touched_fraction + kv_bytes_read

(kv_bytes_read: full-attention layers over the whole context, sliding layers over their window)
    step_time = bytes / (HBM bandwidth * efficiency) + all_to_all_time

All-to-all across nodes (EP over more than one node only): every MoE layer sends each token's
hidden state to its k experts and the results back (dispatch + combine, bf16 activations); with
routing spread evenly, (nodes - 1) / nodes of that leaves the node. A DP rank's TP ranks share
its batch, so per GPU and step:

    a2a_bytes = 2 * k * hidden * 2 bytes * moe_layers * B / TP * (nodes - 1) / nodes
    all_to_all_time = a2a_bytes / (inter-node bandwidth per GPU * efficiency)

added to the memory time (no overlap assumed). Traffic within a node (NVLink) is left out.
    tokens/s per replica = B * DP / step_time

This is an upper bound on a healthy deployment (no compute, communication or scheduling cost);
`efficiency` (default 0.5) discounts achievable bandwidth. The cost estimate divides the replica's
hourly price by that throughput. Both are labelled estimates wherever shown.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_operator.catalog import Accelerator, Architecture


@dataclass(frozen=True)
class ThroughputEstimate:
    """A decode roofline for one replica under stated assumptions."""

    batch_per_dp_rank: int
    context_tokens: int
    efficiency: float
    bytes_per_step_per_gpu: float
    step_time_s: float
    output_tokens_per_s: float
    touched_expert_fraction: float
    all_to_all_s: float = 0.0

    @property
    def assumption(self) -> str:
        comms = (
            "inter-node all-to-all at the same efficiency, no compute cost"
            if self.all_to_all_s
            else "no compute or communication cost"
        )
        return (
            f"decode roofline: {self.batch_per_dp_rank} sequences per DP rank of "
            f"{self.context_tokens} tokens context, {self.efficiency:.0%} of HBM bandwidth, "
            + comms
        )


def decode_roofline(
    arch: Architecture,
    accel: Accelerator,
    *,
    tp: int,
    dp: int,
    ep: int,
    pp: int,
    experts_per_rank: int,
    bytes_per_param: float,
    kv_bytes_per_token_per_gpu: float,
    kv_window_bytes_per_sequence_per_gpu: float = 0.0,
    batch: int = 64,
    context_tokens: int = 4096,
    efficiency: float = 0.5,
    nodes: int = 1,
) -> ThroughputEstimate:
    """Upper-bound decode tokens/s of one replica."""
    tokens_per_step = batch * dp
    k, n = arch.experts_per_token, arch.num_experts
    touched = 1.0 - (1.0 - k / n) ** tokens_per_step
    if ep > 1:
        expert_bytes = arch.expert_params / n * experts_per_rank * bytes_per_param
    else:
        expert_bytes = arch.expert_params * bytes_per_param / tp
    dense_bytes = arch.dense_params * bytes_per_param / tp
    # Full-attention layers read the whole context; sliding-window layers read their window.
    kv_read = (
        kv_bytes_per_token_per_gpu * context_tokens + kv_window_bytes_per_sequence_per_gpu
    ) * batch
    per_gpu = (dense_bytes + expert_bytes * touched) / pp + kv_read
    bandwidth = accel.hbm_bandwidth_gbs * 1e9 * efficiency
    a2a = 0.0
    if ep > 1 and nodes > 1 and accel.interconnect_gbs > 0:
        sent = 2 * k * arch.hidden_size * 2 * arch.num_moe_layers * batch / tp
        a2a = sent * (nodes - 1) / nodes / (accel.interconnect_gbs * 1e9 * efficiency)
    step = per_gpu / bandwidth + a2a
    return ThroughputEstimate(
        batch_per_dp_rank=batch,
        context_tokens=context_tokens,
        efficiency=efficiency,
        bytes_per_step_per_gpu=per_gpu,
        step_time_s=step,
        output_tokens_per_s=tokens_per_step / step if step > 0 else 0.0,
        touched_expert_fraction=touched,
        all_to_all_s=a2a,
    )


def cost_per_million_tokens(hourly_usd: float, tokens_per_s: float) -> float | None:
    """USD per million tokens at a steady rate; None when nothing is produced."""
    if tokens_per_s <= 0:
        return None
    return hourly_usd / (tokens_per_s * 3600.0) * 1e6
