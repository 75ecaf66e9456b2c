"""A 2-node local Ray cluster serving one multi-node replica with real vLLM on the CPU (shared by
the multi-node engine tests): the two layouts' configs, the start/stop, and the greedy request."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx

from moe_serving.config import AppConfig
from moe_serving.local_cluster import LocalCluster, NodeShape
from tests.support.appconfig import tiny_app_config
from tests.support.ports import free_port
from tests.support.served import Served

MAX_TOKENS = 8


def dp_ep_config(model_dir: Path, name: str = "tiny") -> AppConfig:
    return tiny_app_config(
        model_dir,
        name,
        max_model_len=512,
        tensor_parallel_size=1,
        data_parallel_size=2,
        enable_expert_parallel=True,
        distributed_executor_backend="mp",
        resources={"num_cpus_per_rank": 1, "placement_strategy": "PACK"},
    )


def tp_ep_config(model_dir: Path, name: str = "tiny") -> AppConfig:
    """TP2 x EP2 in one engine, one rank per node: vLLM's Ray executor places one rank actor in
    each placement-group bundle (one declared GPU each, STRICT_SPREAD: never the same node)."""
    return tiny_app_config(
        model_dir,
        name,
        max_model_len=512,
        tensor_parallel_size=2,
        enable_expert_parallel=True,
        distributed_executor_backend="ray",
        resources={
            "num_cpus_per_rank": 1,
            "num_gpus_per_rank": 1,
            "placement_strategy": "STRICT_SPREAD",
        },
    )


# The nodes each layout runs on: two workers with one CPU (and, for the Ray executor, one declared
# GPU: its rank actors take one each, as on a GPU node) and a head that takes no rank.
DP_NODES = (NodeShape(num_cpus=1), NodeShape(num_cpus=0))
TP_NODES = (NodeShape(num_cpus=1, num_gpus=1), NodeShape(num_cpus=1))


def serve_on_two_nodes(
    config: AppConfig, nodes: tuple[NodeShape, NodeShape] = DP_NODES
) -> Iterator[Served]:
    """Start the cluster (two workers shaped `nodes[0]`, a head shaped `nodes[1]`), serve."""
    import ray
    from ray import serve

    from moe_serving.app import build_app
    from moe_serving.local import serve_options

    worker, head = nodes
    cluster = LocalCluster([worker] * 2, head=head)
    cluster.start()
    http_port, grpc_port = free_port(), free_port()
    try:
        ray.init(address=cluster.address, log_to_driver=False, namespace="multinode")
        cluster.wait_for_nodes()
        options = serve_options(http_port, grpc_port, host="127.0.0.1")
        serve.start(proxy_location="HeadOnly", **options)
        serve.run(build_app(config.model_dump(mode="json")), name="moe", route_prefix="/")
        yield Served(
            f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", config, cluster=cluster
        )
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.stop()


def greedy_reply(base: str, prompt_ids: list[int], timeout: float = 300) -> httpx.Response:
    """A greedy completion of token ids that also returns the answer's token ids."""
    return httpx.post(
        f"{base}/v1/completions",
        json={
            "model": "tiny-moe",
            "prompt": prompt_ids,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
        timeout=timeout,
    )


def completion_tokens(base: str, prompt_ids: list[int], timeout: float = 300) -> list[int]:
    """The token ids of a greedy completion (vLLM's return_token_ids)."""
    reply = greedy_reply(base, prompt_ids, timeout)
    assert reply.status_code == 200, reply.text
    return list(reply.json()["choices"][0]["token_ids"])
