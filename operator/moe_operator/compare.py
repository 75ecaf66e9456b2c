"""Layouts compared before deploying (`moectl plan --compare`): pure, spec -> table.

Every layout that fits the spec (each world size, each TP x DP split; with and without expert
parallelism) is planned as the planner plans its choice, so each row carries the same numbers a
deployment would show: GPUs and nodes per replica, KV capacity in full-length sequences, the
decode roofline's tokens/s per replica (throughput.py, with its inter-node all-to-all term),
$/hour and $ per million output tokens. The planner's choice is marked with its rule, and the
plain answer to "does expert parallelism pay here" is computed from the rows, not assumed.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from moe_operator.api import MoEDeploymentSpec
from moe_operator.planner import Plan, PlanningError, ReplicaLayout, layouts

CHOICE_RULE = (
    "the planner's rule: the smallest replica that holds the weights plus one full-length "
    "sequence's KV cache, then the split with the most KV capacity (ties: more TP); more "
    "replicas of it scale out"
)


class Row(ReplicaLayout):
    """One layout that fits (its parallel sizes, GPUs and nodes: `ReplicaLayout`)."""

    layout: str = Field(description="The plan's one-line summary.")
    expert_parallel: bool
    max_full_length_sequences: int
    output_tokens_per_s: float = Field(description="Decode roofline per replica (estimate).")
    hourly_usd: float
    usd_per_million_output_tokens: float | None
    chosen: bool = Field(description="What the planner picks for this spec as written.")


class Comparison(BaseModel):
    """Every fitting layout, the choice and why, and whether expert parallelism pays."""

    model_config = ConfigDict(extra="forbid")

    architecture: str
    accelerator: str
    throughput_assumption: str
    rows: list[Row]
    chosen_reason: str
    expert_parallelism: str = Field(description="The plain answer: does EP pay for this spec.")


def _key(p: Plan) -> tuple[int, ...]:
    return (
        p.expert_parallel_size,
        p.tensor_parallel_size,
        p.data_parallel_size,
        p.pipeline_parallel_size,
    )


def _row(p: Plan, ep_on: bool, chosen: Plan | None) -> Row:
    # Fields named alike in Row and Plan (the `ReplicaLayout` sizes, GPUs and nodes, and the KV
    # capacity) are the plan's.
    same = {name: getattr(p, name) for name in Row.model_fields.keys() & Plan.model_fields.keys()}
    return Row(
        **same,
        layout=p.summary,
        expert_parallel=ep_on,
        output_tokens_per_s=p.assumed_output_tokens_per_s,
        hourly_usd=p.hourly_cost_per_replica,
        usd_per_million_output_tokens=p.cost_per_million_output_tokens,
        chosen=chosen is not None and _key(p) == _key(chosen),
    )


def _cost(r: Row) -> float | None:
    """$ per million output tokens, None where the layout has no price (CPU, price 0)."""
    if not r.hourly_usd or r.usd_per_million_output_tokens is None:
        return None
    return r.usd_per_million_output_tokens


def _best(rows: list[Row], priced: bool) -> Row | None:
    """The cheapest row per token (priced), else the most tokens/s per GPU."""
    if priced:
        return min(rows, key=lambda r: _cost(r) or 0.0, default=None)
    return max(rows, key=lambda r: r.output_tokens_per_s / r.gpus_per_replica, default=None)


def _ep_answer(rows: list[Row]) -> str:
    priced = all(_cost(r) is not None for r in rows)
    ep = _best([r for r in rows if r.expert_parallel_size > 1], priced)
    plain = _best([r for r in rows if r.expert_parallel_size == 1], priced)
    one_gpu = any(r.gpus_per_replica == 1 for r in rows)
    if ep is None:
        return "no expert-parallel layout fits this spec; replicas without EP are the option"
    if plain is None:
        return f"expert parallelism is needed: no layout without it fits ({ep.layout} does)"

    def measure(r: Row) -> str:
        if priced:
            return f"${_cost(r):.3f}/M output tokens"
        return f"{r.output_tokens_per_s / r.gpus_per_replica:,.0f} tokens/s per rank (no price)"

    better = (
        (_cost(ep) or 0.0) < (_cost(plain) or 0.0)
        if priced
        else (
            ep.output_tokens_per_s / ep.gpus_per_replica
            > plain.output_tokens_per_s / plain.gpus_per_replica
        )
    )
    fits_one = " (the model fits one GPU: N independent one-GPU replicas)" if one_gpu else ""
    if not better:
        return (
            f"expert parallelism does not pay here: {plain.layout}{fits_one} gives "
            f"{measure(plain)} vs {measure(ep)} for the best EP layout ({ep.layout}); "
            "scale out with replicas of it"
        )
    return (
        f"expert parallelism pays: {ep.layout} gives {measure(ep)} vs {measure(plain)} for the "
        f"best layout without it ({plain.layout}{fits_one})"
    )


def compare(spec: MoEDeploymentSpec, model_config: dict[str, Any] | None = None) -> Comparison:
    """Every fitting layout of `spec`, and of `spec` with expert parallelism switched."""
    chosen, mine = layouts(spec, model_config)
    ep_on = spec.parallelism.expert_parallel
    rows = [_row(p, ep_on, chosen) for p in mine]
    other = spec.model_copy(
        update={"parallelism": spec.parallelism.model_copy(update={"expert_parallel": not ep_on})}
    )
    try:
        _, theirs = layouts(other, model_config)
    except PlanningError:
        theirs = []  # nothing fits the other way: the rows say so by their absence
    rows += [_row(p, not ep_on, None) for p in theirs]
    rows.sort(key=lambda r: (r.gpus_per_replica, not r.expert_parallel, -r.tensor_parallel_size))
    return Comparison(
        architecture=chosen.architecture,
        accelerator=chosen.accelerator,
        throughput_assumption=chosen.throughput_assumption,
        rows=rows,
        chosen_reason=f"{chosen.summary}: {CHOICE_RULE}",
        expert_parallelism=_ep_answer(rows),
    )


def table(c: Comparison) -> str:
    """The human-readable comparison."""
    head = ("", "layout", "KV seqs", "tok/s/replica", "$/hour", "$/M out")
    body = [
        (
            "*" if r.chosen else "",
            r.layout,
            f"{r.max_full_length_sequences:,}",
            f"{r.output_tokens_per_s:,.0f}",
            f"{r.hourly_usd:.2f}",
            "-"
            if r.usd_per_million_output_tokens is None
            else f"{r.usd_per_million_output_tokens:.3f}",
        )
        for r in c.rows
    ]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = [
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in [head, *body]
    ]
    lines += [
        "",
        f"* chosen: {c.chosen_reason}",
        f"expert parallelism: {c.expert_parallelism}",
        f"estimates: {c.throughput_assumption}",
    ]
    return f"{c.architecture} on {c.accelerator}\n" + "\n".join(lines)
