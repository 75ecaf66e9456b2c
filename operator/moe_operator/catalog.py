"""Built-in catalog of MoE architectures and accelerators (pure data, no I/O).

Each architecture lists the numbers the planner needs: expert count and size, routing top-k,
attention shape for the KV cache, and parameter counts. Sources are the models' published
`config.json` files (Hugging Face) and model cards, noted per entry.

A local checkpoint is described from its own `config.json` (`from_hf_config`), so a model not in
the catalog still plans when its weights are on disk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Architecture:
    """The shape of one MoE model, as far as placement and memory are concerned."""

    key: str
    family: str  # gemma4 | mixtral | qwen3_moe | deepseek_v3 | ...
    hf_ids: tuple[str, ...]
    num_layers: int
    num_moe_layers: int
    hidden_size: int
    num_experts: int
    experts_per_token: int
    moe_intermediate_size: int
    num_shared_experts: int
    total_params: float  # parameters, all experts included
    active_params: float  # parameters touched per token
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    vocab_size: int
    # KV cache: layers that keep every token, and sliding-window layers that keep `window`.
    full_attention_layers: int
    sliding_window: int = 0
    kv_bytes_elements_per_token_full: int = 0  # K+V elements per token per full layer (0: derive)
    kv_elements_per_token_sliding: int = 0
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    source: str = ""
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def expert_params(self) -> float:
        """Parameters in the routed experts (gate, up and down projections)."""
        return float(
            self.num_moe_layers
            * self.num_experts
            * 3
            * self.hidden_size
            * self.moe_intermediate_size
        )

    @property
    def dense_params(self) -> float:
        """Everything that is not a routed expert (attention, embeddings, dense/shared MLPs)."""
        return max(self.total_params - self.expert_params, 0.0)

    def kv_elements_per_token(self) -> int:
        """K+V elements stored per token in full-attention layers (all ranks together)."""
        if self.kv_bytes_elements_per_token_full:
            return self.kv_bytes_elements_per_token_full * self.full_attention_layers
        return 2 * self.num_kv_heads * self.head_dim * self.full_attention_layers

    def kv_elements_sliding_per_sequence(self) -> int:
        """K+V elements a sequence keeps in sliding-window layers (bounded by the window)."""
        sliding_layers = self.num_layers - self.full_attention_layers
        if not self.sliding_window or sliding_layers <= 0:
            return 0
        per_token = self.kv_elements_per_token_sliding or 2 * self.num_kv_heads * self.head_dim
        return per_token * sliding_layers * self.sliding_window


def _gemma4_26b() -> Architecture:
    # Gemma 4 26B-A4B (google/gemma-4-26B-A4B-it config.json, text_config): 30 layers, hidden
    # 2816, 128 experts of width 704 with top_k_experts=8, a dense MLP of 2112 beside the MoE
    # block in every layer, 16 query heads; sliding layers (5 of every 6) use 8 KV heads of 256
    # over a 1024-token window; full layers use 2 global KV heads of 512 with K == V
    # (attention_k_eq_v), so one tensor of 2*512 elements per token per full layer.
    #
    # Routing: sources disagree (top-2 vs top-8 of 128). We use top-8 because it is what the
    # published config.json says, and because only top-8 matches the "A4B" name: 8 experts x
    # 3 x 2816 x 704 x 30 layers = 1.43B expert parameters per token, plus ~2.3B dense
    # (attention, dense MLP, embeddings) = ~3.8B active; top-2 would give ~2.6B.
    return Architecture(
        key="gemma-4-26b-a4b",
        family="gemma4",
        hf_ids=("google/gemma-4-26B-A4B", "google/gemma-4-26B-A4B-it"),
        num_layers=30,
        num_moe_layers=30,
        hidden_size=2816,
        num_experts=128,
        experts_per_token=8,
        moe_intermediate_size=704,
        num_shared_experts=0,
        total_params=25.97e9,
        active_params=3.8e9,
        num_attention_heads=16,
        num_kv_heads=8,
        head_dim=256,
        max_context=262_144,
        vocab_size=262_144,
        full_attention_layers=5,
        sliding_window=1024,
        kv_bytes_elements_per_token_full=2 * 512,  # 2 global KV heads x 512, K == V
        kv_elements_per_token_sliding=2 * 8 * 256,
        tool_call_parser="gemma4",
        reasoning_parser="gemma4",
        source="huggingface.co/google/gemma-4-26B-A4B-it config.json; model card",
        notes="top-8 of 128 routing (see comment); hybrid dense MLP + MoE in every layer",
    )


ARCHITECTURES: dict[str, Architecture] = {
    a.key: a
    for a in (
        _gemma4_26b(),
        # Mixtral 8x7B (mistralai/Mixtral-8x7B-v0.1 config.json): 32 layers, hidden 4096, 8
        # experts of 14336, top-2, 32 heads / 8 KV heads of 128, 32k context. 46.7B / 12.9B.
        Architecture(
            key="mixtral-8x7b",
            family="mixtral",
            hf_ids=("mistralai/Mixtral-8x7B-v0.1", "mistralai/Mixtral-8x7B-Instruct-v0.1"),
            num_layers=32,
            num_moe_layers=32,
            hidden_size=4096,
            num_experts=8,
            experts_per_token=2,
            moe_intermediate_size=14336,
            num_shared_experts=0,
            total_params=46.7e9,
            active_params=12.9e9,
            num_attention_heads=32,
            num_kv_heads=8,
            head_dim=128,
            max_context=32_768,
            vocab_size=32_000,
            full_attention_layers=32,
            tool_call_parser="mistral",
            reasoning_parser=None,
            source="huggingface.co/mistralai/Mixtral-8x7B-v0.1 config.json",
        ),
        # Mixtral 8x22B (mistralai/Mixtral-8x22B-v0.1): 56 layers, hidden 6144, 8 experts of
        # 16384, top-2, 48 heads / 8 KV heads of 128, 64k context. 141B / 39B.
        Architecture(
            key="mixtral-8x22b",
            family="mixtral",
            hf_ids=("mistralai/Mixtral-8x22B-v0.1", "mistralai/Mixtral-8x22B-Instruct-v0.1"),
            num_layers=56,
            num_moe_layers=56,
            hidden_size=6144,
            num_experts=8,
            experts_per_token=2,
            moe_intermediate_size=16384,
            num_shared_experts=0,
            total_params=141e9,
            active_params=39e9,
            num_attention_heads=48,
            num_kv_heads=8,
            head_dim=128,
            max_context=65_536,
            vocab_size=32_768,
            full_attention_layers=56,
            tool_call_parser="mistral",
            reasoning_parser=None,
            source="huggingface.co/mistralai/Mixtral-8x22B-v0.1 config.json",
        ),
        # Qwen3-30B-A3B (Qwen/Qwen3-30B-A3B config.json): 48 layers, hidden 2048, 128 experts
        # of 768, top-8, 32 heads / 4 KV heads of 128, 32k native (128k with YaRN). 30.5B / 3.3B.
        Architecture(
            key="qwen3-30b-a3b",
            family="qwen3_moe",
            hf_ids=("Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-30B-A3B-Instruct-2507"),
            num_layers=48,
            num_moe_layers=48,
            hidden_size=2048,
            num_experts=128,
            experts_per_token=8,
            moe_intermediate_size=768,
            num_shared_experts=0,
            total_params=30.5e9,
            active_params=3.3e9,
            num_attention_heads=32,
            num_kv_heads=4,
            head_dim=128,
            max_context=131_072,
            vocab_size=151_936,
            full_attention_layers=48,
            tool_call_parser="hermes",
            reasoning_parser="qwen3",
            source="huggingface.co/Qwen/Qwen3-30B-A3B config.json",
        ),
        # Qwen3-235B-A22B: 94 layers, hidden 4096, 128 experts of 1536, top-8, 64 heads / 4 KV
        # heads of 128. 235B / 22B.
        Architecture(
            key="qwen3-235b-a22b",
            family="qwen3_moe",
            hf_ids=("Qwen/Qwen3-235B-A22B", "Qwen/Qwen3-235B-A22B-Instruct-2507"),
            num_layers=94,
            num_moe_layers=94,
            hidden_size=4096,
            num_experts=128,
            experts_per_token=8,
            moe_intermediate_size=1536,
            num_shared_experts=0,
            total_params=235e9,
            active_params=22e9,
            num_attention_heads=64,
            num_kv_heads=4,
            head_dim=128,
            max_context=131_072,
            vocab_size=151_936,
            full_attention_layers=94,
            tool_call_parser="hermes",
            reasoning_parser="qwen3",
            source="huggingface.co/Qwen/Qwen3-235B-A22B config.json",
        ),
        # DeepSeek-V3 (deepseek-ai/DeepSeek-V3 config.json): 61 layers (first 3 dense), hidden
        # 7168, 256 routed experts of 2048 + 1 shared, top-8, MLA attention whose cache is the
        # compressed latent (kv_lora_rank 512 + rope 64 = 576 elements per token per layer).
        # 671B / 37B; 128k context.
        Architecture(
            key="deepseek-v3",
            family="deepseek_v3",
            hf_ids=("deepseek-ai/DeepSeek-V3", "deepseek-ai/DeepSeek-V3-0324"),
            num_layers=61,
            num_moe_layers=58,
            hidden_size=7168,
            num_experts=256,
            experts_per_token=8,
            moe_intermediate_size=2048,
            num_shared_experts=1,
            total_params=671e9,
            active_params=37e9,
            num_attention_heads=128,
            num_kv_heads=1,
            head_dim=576,
            max_context=131_072,
            vocab_size=129_280,
            full_attention_layers=61,
            kv_bytes_elements_per_token_full=576,
            tool_call_parser="deepseek_v3",
            reasoning_parser="deepseek_r1",
            source="huggingface.co/deepseek-ai/DeepSeek-V3 config.json",
            notes="MLA: KV cache is replicated on every TP rank (latent is not head-sharded)",
        ),
    )
}


@dataclass(frozen=True)
class Accelerator:
    """An accelerator type: memory and an indicative on-demand hourly price."""

    name: str
    memory_gib: float
    hbm_bandwidth_gbs: float
    hourly_price_usd: float
    k8s_resource: str = "nvidia.com/gpu"
    node_label: str = "nvidia.com/gpu.product"
    node_label_value: str = ""
    #: The `accelerator_type:<name>` resource Ray's GPU autodetection gives a node with this
    #: GPU (ray/_private/accelerators/nvidia_gpu.py: "NVIDIA A100-SXM4-80GB" -> "A100"). Ray
    #: never adds the sized names (A100-40G / A100-80G, ray/util/accelerators/accelerators.py)
    #: to a node by itself, so bundles asking for them would never be placed.
    ray_accelerator_type: str = ""
    #: What NVML reports as the device name (the input of Ray's autodetection), for tests
    #: and for local clusters that declare what a real node of this kind declares.
    nvml_name: str = ""
    #: Network bandwidth per GPU between nodes, GB/s (one GPU-direct RDMA NIC per GPU, as on
    #: DGX-class nodes: HDR InfiniBand 200 Gb/s for A100, NDR 400 Gb/s for H100/H200;
    #: 100 Gb/s Ethernet assumed for L40S); 0 for none. Only the all-to-all term of the
    #: throughput estimate reads it (throughput.py).
    interconnect_gbs: float = 0.0


#: Prices: indicative on-demand USD per GPU-hour (public cloud list prices, late 2025); users
#: should set spec.pricing.hourlyPricePerGpu to their own.
ACCELERATORS: dict[str, Accelerator] = {
    "A100-40GB": Accelerator(
        "A100-40GB",
        40,
        1555,
        3.67,
        node_label_value="NVIDIA-A100-SXM4-40GB",
        ray_accelerator_type="A100",
        nvml_name="NVIDIA A100-SXM4-40GB",
        interconnect_gbs=25,
    ),
    "A100-80GB": Accelerator(
        "A100-80GB",
        80,
        2039,
        4.10,
        node_label_value="NVIDIA-A100-SXM4-80GB",
        ray_accelerator_type="A100",
        nvml_name="NVIDIA A100-SXM4-80GB",
        interconnect_gbs=25,
    ),
    "H100-80GB": Accelerator(
        "H100-80GB",
        80,
        3350,
        6.98,
        node_label_value="NVIDIA-H100-80GB-HBM3",
        ray_accelerator_type="H100",
        nvml_name="NVIDIA H100 80GB HBM3",
        interconnect_gbs=50,
    ),
    "H200-141GB": Accelerator(
        "H200-141GB",
        141,
        4800,
        8.50,
        node_label_value="NVIDIA-H200",
        ray_accelerator_type="H200",
        nvml_name="NVIDIA H200",
        interconnect_gbs=50,
    ),
    "L40S-48GB": Accelerator(
        "L40S-48GB",
        48,
        864,
        1.96,
        node_label_value="NVIDIA-L40S",
        ray_accelerator_type="L40S",
        nvml_name="NVIDIA L40S",
        interconnect_gbs=12.5,
    ),
    # Local runs: ranks are CPU processes; memory per rank is a budget, not a device size.
    "CPU": Accelerator("CPU", 8, 50, 0.0, k8s_resource="", node_label=""),
}


def lookup(key: str) -> Architecture | None:
    """Find an architecture by catalog key or Hugging Face id (case-insensitive)."""
    wanted = key.lower()
    for arch in ARCHITECTURES.values():
        if arch.key == wanted or wanted in (h.lower() for h in arch.hf_ids):
            return arch
    return None


def _get(cfg: dict[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return default


def from_hf_config(config: dict[str, Any], key: str = "local") -> Architecture:
    """Describe a checkpoint from its Hugging Face `config.json` (nested text_config allowed).

    Raises ValueError when the config is not a MoE model.
    """
    cfg = dict(config.get("text_config") or config)
    model_type = str(_get(cfg, "model_type", default=config.get("model_type", "unknown")))
    experts = _get(cfg, "num_experts", "num_local_experts", "n_routed_experts")
    top_k = _get(cfg, "top_k_experts", "num_experts_per_tok", "moe_topk")
    if not experts or not top_k:
        raise ValueError(
            f"config.json (model_type {model_type!r}) describes no mixture-of-experts layers "
            "(no num_experts / num_local_experts / n_routed_experts): MoE Operator serves "
            "MoE models"
        )
    hidden = int(cfg["hidden_size"])
    layers = int(cfg["num_hidden_layers"])
    heads = int(_get(cfg, "num_attention_heads", default=1))
    head_dim = int(_get(cfg, "head_dim", default=hidden // max(heads, 1)))
    kv_heads = int(_get(cfg, "num_key_value_heads", default=heads))
    moe_inter = int(_get(cfg, "moe_intermediate_size", "intermediate_size", default=hidden * 4))
    dense_start = int(_get(cfg, "first_k_dense_replace", default=0))
    vocab = int(_get(cfg, "vocab_size", default=32_000))
    layer_types = cfg.get("layer_types") or []
    full_layers = sum(1 for t in layer_types if t == "full_attention") if layer_types else layers
    window = int(_get(cfg, "sliding_window", default=0) or 0) if layer_types else 0
    moe_layers = layers - dense_start
    expert_params = moe_layers * int(experts) * 3 * hidden * moe_inter
    attn = layers * (hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2)
    dense_mlp = layers * 3 * hidden * int(_get(cfg, "intermediate_size", default=0) or 0)
    if model_type in ("mixtral", "qwen3_moe", "qwen2_moe"):
        dense_mlp = 0  # their intermediate_size is the experts' width, not a dense MLP
    embed = vocab * hidden * (1 if cfg.get("tie_word_embeddings") else 2)
    total = float(expert_params + attn + dense_mlp + embed)
    active = float(expert_params * int(top_k) / int(experts) + attn + dense_mlp + embed)
    family = {"gemma4_text": "gemma4", "gemma4": "gemma4"}.get(model_type, model_type)
    catalog_family = next((a for a in ARCHITECTURES.values() if a.family == family), None)
    return Architecture(
        key=key,
        family=family,
        hf_ids=(),
        num_layers=layers,
        num_moe_layers=moe_layers,
        hidden_size=hidden,
        num_experts=int(experts),
        experts_per_token=int(top_k),
        moe_intermediate_size=moe_inter,
        num_shared_experts=int(_get(cfg, "n_shared_experts", default=0) or 0),
        total_params=total,
        active_params=active,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_context=int(_get(cfg, "max_position_embeddings", default=4096)),
        vocab_size=vocab,
        full_attention_layers=max(full_layers, 1),
        sliding_window=window,
        tool_call_parser=catalog_family.tool_call_parser if catalog_family else None,
        reasoning_parser=catalog_family.reasoning_parser if catalog_family else None,
        source="config.json of the local checkpoint",
    )


def gib(n_bytes: float) -> float:
    """Bytes to GiB."""
    return n_bytes / 2**30


def ceil_div(a: int, b: int) -> int:
    """Integer ceiling division."""
    return -(-a // b)


def is_power_of_two(n: int) -> bool:
    """True for 1, 2, 4, 8, ..."""
    return n > 0 and (n & (n - 1)) == 0 and math.log2(n).is_integer()
