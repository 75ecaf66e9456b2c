"""Built-in catalog of MoE architectures and accelerators.

Each architecture lists the numbers the planner needs: expert count and size, routing top-k,
attention shape for the KV cache, and parameter counts. Sources are the models' published
`config.json` files (Hugging Face) and model cards, noted per entry.

The rows are data: `catalog.yaml`, shipped in this package, with each row's provenance as a
comment. It is read once, at import (the only I/O here), and every row is checked against its
class (`Architecture`, `Accelerator`): unknown or missing fields and values of the wrong type
stop the import with the row named.

A local checkpoint is described from its own `config.json` (`from_hf_config`), so a model not in
the catalog still plans when its weights are on disk.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml


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


_Row = typing.TypeVar("_Row", Architecture, Accelerator)


def _checks(value: Any, hint: Any) -> bool:
    """Whether `value`, as YAML gives it, is of the type a catalog field declares."""
    if hint is Any:
        return True
    if hint is float:  # an int is a float here, as in a Python literal (kept as it is)
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is str or hint is type(None):
        return isinstance(value, hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is types.UnionType or origin is typing.Union:
        return any(_checks(value, arg) for arg in args)
    if origin is tuple:  # tuple[X, ...]
        return isinstance(value, tuple) and all(_checks(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _checks(k, args[0]) and _checks(v, args[1]) for k, v in value.items()
        )
    raise TypeError(f"catalog.yaml: no check for the field type {hint!r}")


def _rows(cls: type[_Row], rows: Any, section: str) -> list[_Row]:
    """The rows of one section of catalog.yaml, as instances of `cls`, each checked."""
    if not isinstance(rows, list):
        raise ValueError(f"catalog.yaml: {section!r} must be a list of rows")
    hints = typing.get_type_hints(cls)
    out = []
    for i, row in enumerate(rows):
        where = f"catalog.yaml: {section}[{i}]"
        if not isinstance(row, dict):
            raise ValueError(f"{where} is not a mapping")
        # A YAML list stands for a tuple field (hf_ids).
        values: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) and typing.get_origin(hints.get(k)) is tuple else v
            for k, v in row.items()
        }
        try:
            item = cls(**values)
        except TypeError as err:  # an unknown or a missing field
            raise ValueError(f"{where}: {err}") from None
        for f in dataclasses.fields(cls):
            value = getattr(item, f.name)
            if not _checks(value, hints[f.name]):
                hint = hints[f.name]
                want = hint.__name__ if isinstance(hint, type) else hint
                raise ValueError(f"{where}: {f.name} = {value!r} is not of type {want}")
        out.append(item)
    return out


def _load() -> tuple[dict[str, Architecture], dict[str, Accelerator]]:
    """Read catalog.yaml from the installed package: architectures and accelerators by key."""
    text = resources.files("moe_operator").joinpath("catalog.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    if not isinstance(data, dict) or set(data) != {"architectures", "accelerators"}:
        raise ValueError("catalog.yaml must hold exactly 'architectures' and 'accelerators'")
    archs = _rows(Architecture, data["architectures"], "architectures")
    accels = _rows(Accelerator, data["accelerators"], "accelerators")
    by_key = {a.key: a for a in archs}
    by_name = {a.name: a for a in accels}
    if len(by_key) != len(archs) or len(by_name) != len(accels):
        raise ValueError("catalog.yaml: a key or an accelerator name stands twice")
    return by_key, by_name


#: The built-in architectures by catalog key, and the accelerators by name, in catalog.yaml's
#: order. Prices: indicative on-demand USD per GPU-hour (public cloud list prices, late 2025);
#: users should set spec.pricing.hourlyPricePerGpu to their own.
ARCHITECTURES, ACCELERATORS = _load()


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
