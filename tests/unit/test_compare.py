"""`moectl plan --compare`: every fitting layout, the choice, and whether EP pays (pure)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from unit_support import CLUSTER_EXAMPLES, load

from moe_operator.api import MoEDeploymentSpec
from moe_operator.catalog import ACCELERATORS, ARCHITECTURES
from moe_operator.compare import Comparison, Row, compare
from moe_operator.planner import PlanningError, plan
from moe_operator.throughput import decode_roofline


def spec(**overrides: Any) -> MoEDeploymentSpec:
    base: dict[str, Any] = {"model": {"name": "m", "source": "hf://google/gemma-4-26B-A4B-it"}}
    base.update(overrides)
    return MoEDeploymentSpec.model_validate(base)


def _key(r: Row) -> tuple[int, int, int, int]:
    return (
        r.expert_parallel_size,
        r.tensor_parallel_size,
        r.data_parallel_size,
        r.pipeline_parallel_size,
    )


def _check_answer(c: Comparison) -> None:
    """The EP sentence agrees with the rows it is computed from."""
    ep = [r.usd_per_million_output_tokens or 0.0 for r in c.rows if r.expert_parallel_size > 1]
    plain = [r.usd_per_million_output_tokens or 0.0 for r in c.rows if r.expert_parallel_size == 1]
    if ep and plain:
        pays = min(ep) < min(plain)
        assert c.expert_parallelism.startswith(
            "expert parallelism pays" if pays else "expert parallelism does not pay"
        ), c.expert_parallelism
        assert f"${min(ep):.3f}/M" in c.expert_parallelism
        assert f"${min(plain):.3f}/M" in c.expert_parallelism


@pytest.mark.parametrize("path", CLUSTER_EXAMPLES, ids=lambda p: p.name)
def test_examples_compare_marks_the_planners_choice(path: Any) -> None:
    s = MoEDeploymentSpec.model_validate(load(path)["spec"])
    chosen = plan(s)
    c = compare(s)
    marked = [r for r in c.rows if r.chosen]
    assert len(marked) == 1
    row = marked[0]
    assert row.layout == chosen.summary
    assert row.max_full_length_sequences == chosen.max_full_length_sequences
    assert row.output_tokens_per_s == chosen.assumed_output_tokens_per_s
    assert row.usd_per_million_output_tokens == chosen.cost_per_million_output_tokens
    assert chosen.summary in c.chosen_reason
    # No layout listed twice; every row is a layout the spec (or its EP twin) can take.
    assert len({(_key(r), r.expert_parallel) for r in c.rows}) == len(c.rows)
    assert all(r.max_full_length_sequences >= 1 for r in c.rows)
    # Every smaller replica than the choice would not fit with the spec's own EP setting.
    same_mode = [r for r in c.rows if r.expert_parallel == s.parallelism.expert_parallel]
    assert min(r.gpus_per_replica for r in same_mode) == chosen.gpus_per_replica
    _check_answer(c)


def test_a_model_that_fits_one_gpu_gets_the_plain_answer() -> None:
    s = spec(
        resources={"accelerator": "H200-141GB", "gpusPerNode": 8},
        model={"name": "m", "source": "hf://google/gemma-4-26B-A4B-it", "maxModelLen": 8192},
    )
    c = compare(s)
    one = [r for r in c.rows if r.gpus_per_replica == 1]
    assert one and all(r.expert_parallel_size == 1 for r in one)
    assert "fits one GPU" in c.expert_parallelism
    _check_answer(c)


def test_ep_twin_that_cannot_fit_is_left_out() -> None:
    # DeepSeek-V3 fits 4 nodes only with its experts sharded: without EP nothing fits.
    path = next(p for p in CLUSTER_EXAMPLES if p.name.startswith("deepseek"))
    s = MoEDeploymentSpec.model_validate(load(path)["spec"])
    twin = s.model_copy(
        update={"parallelism": s.parallelism.model_copy(update={"expert_parallel": False})}
    )
    with pytest.raises(PlanningError):
        plan(twin)
    c = compare(s)
    assert all(r.expert_parallel for r in c.rows)
    assert c.expert_parallelism.startswith("expert parallelism is needed")


def test_all_to_all_term_only_across_nodes_and_as_stated() -> None:
    arch, accel = ARCHITECTURES["deepseek-v3"], ACCELERATORS["A100-80GB"]
    common: dict[str, Any] = dict(
        tp=1,
        dp=32,
        ep=32,
        pp=1,
        experts_per_rank=8,
        bytes_per_param=1.0,
        kv_bytes_per_token_per_gpu=70_000.0,
    )
    one = decode_roofline(arch, accel, nodes=1, **common)
    four = decode_roofline(arch, accel, nodes=4, **common)
    assert one.all_to_all_s == 0.0
    # throughput.py: 2 (dispatch + combine) x k x hidden x 2 bytes x MoE layers x batch / TP,
    # 3/4 of it off the node, at 50% of the per-GPU inter-node bandwidth.
    sent = 2 * arch.experts_per_token * arch.hidden_size * 2 * arch.num_moe_layers * 64
    expected = sent * 3 / 4 / (accel.interconnect_gbs * 1e9 * 0.5)
    assert four.all_to_all_s == pytest.approx(expected)
    assert four.step_time_s == pytest.approx(one.step_time_s + expected)
    assert four.output_tokens_per_s < one.output_tokens_per_s
    assert "all-to-all" in four.assumption and "communication" in one.assumption
    no_ep = decode_roofline(arch, accel, nodes=4, **{**common, "ep": 1})
    assert no_ep.all_to_all_s == 0.0


@pytest.mark.parametrize("output", ["table", "json"])
def test_moectl_plan_compare(output: str) -> None:
    path = next(p for p in CLUSTER_EXAMPLES if p.name.startswith("mixtral"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe_operator.cli",
            "plan",
            "--compare",
            "-f",
            str(path),
            "-o",
            output,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    if output == "json":
        c = Comparison.model_validate(json.loads(done.stdout))
        assert sum(r.chosen for r in c.rows) == 1
    else:
        chosen = plan(MoEDeploymentSpec.model_validate(load(path)["spec"]))
        starred = [line for line in done.stdout.splitlines() if line.startswith("*  ")]
        assert len(starred) == 1 and chosen.summary in starred[0]
        assert "expert parallelism:" in done.stdout
