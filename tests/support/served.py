"""A deployed application as the served-app tests reach it, the in-process way to deploy one (a
Ray cluster in this process, Serve's HTTP and gRPC proxies on free loopback ports), and a full
admission queue."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import httpx
import openai

from moe_serving.config import AppConfig
from moe_serving.proto import inference_pb2_grpc as pb_grpc

from .ports import free_port
from .waiting import wait_until

if TYPE_CHECKING:
    from moe_serving.local_cluster import LocalCluster


@dataclass
class Served:
    """One deployed app: where to reach it, what it runs and, for a multi-node app, the local
    cluster it runs on. A test module that needs more extends it (a subclass with more fields,
    deployed with `running_app(..., kind=Subclass, field=...)`)."""

    http: str  # base URL, e.g. http://127.0.0.1:8123
    grpc_target: str  # host:port of Serve's gRPC proxy
    config: AppConfig
    cluster: LocalCluster | None = None
    stopped: bool = False  # a test ended the Ray cluster itself: nothing left to shut down

    @property
    def model_dir(self) -> Path:
        return Path(self.config.engine.model)

    def client(self, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.http}/v1", api_key="unused", **kwargs)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.grpc_target)

    def stub(self) -> pb_grpc.InferenceServiceStub:
        return pb_grpc.InferenceServiceStub(self.channel())

    def metrics(self, headers: dict[str, str] | None = None) -> str:
        return httpx.get(f"{self.http}/metrics", headers=headers, timeout=30).text

    def depth(self) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(f"{self.http}/health", timeout=30).json()
        return body

    def wait_depth(
        self, ok: Callable[[dict[str, Any]], bool], timeout_s: float = 120
    ) -> dict[str, Any]:
        """Poll the replica's queue depth until `ok` (a generous bound: only a hang fails);
        a read that fails meanwhile is polled again."""
        return wait_until(
            self.depth,
            timeout_s,
            0.2,
            "queue depth never settled",
            ok=ok,
            ignore=(httpx.HTTPError, ValueError, KeyError),
        )


S = TypeVar("S", bound=Served)


@contextmanager
def running_app(
    config: AppConfig, namespace: str, kind: type[S] = Served, **extra: Any
) -> Iterator[S]:
    """Deploys `config` (Ray in this process, in `namespace`); yields `kind(http, grpc_target,
    config, **extra)`; stops Serve (unless the test stopped the cluster) and Ray after."""
    import ray
    from ray import serve

    from moe_serving.app import build_app
    from moe_serving.local import serve_options

    http_port, grpc_port = free_port(), free_port()
    ray.init(include_dashboard=False, log_to_driver=False, namespace=namespace)
    served: S | None = None
    try:
        options = serve_options(http_port, grpc_port, host="127.0.0.1")
        serve.start(http_options=options["http_options"], grpc_options=options["grpc_options"])
        serve.run(
            build_app(config.model_dump(mode="json")),
            name=config.deployment_name,
            route_prefix="/",
            blocking=False,
        )
        served = kind(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", config, **extra)
        yield served
    finally:
        if served is None or not served.stopped:
            serve.shutdown()
        ray.shutdown()


@contextmanager
def full_queue(
    served: Served,
    body: dict[str, Any],
    running: int,
    queued: int,
    headers: dict[str, str] | None = None,
) -> Iterator[list[int]]:
    """`running + queued` long streamed completions (`body`) held open until the block ends:
    the engine runs `running` of them, the replica queues the rest; yields their status codes.
    Returns once the replica reports exactly that, and lets the streams go at the end."""
    release = threading.Event()
    statuses: list[int] = []

    def hold() -> None:
        with httpx.stream(
            "POST", f"{served.http}/v1/completions", json=body, headers=headers, timeout=120
        ) as response:
            statuses.append(response.status_code)
            release.wait(120)

    with ExitStack() as stack:
        for _ in range(running + queued):
            thread = threading.Thread(target=hold)
            thread.start()
            stack.callback(thread.join, 150)
        stack.callback(release.set)
        served.wait_depth(lambda d: d["in_engine"] == running and d["queued"] == queued)
        yield statuses
