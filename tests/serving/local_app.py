"""The start and stop every served-app test module shares: one Ray cluster in this process,
Serve's HTTP and gRPC proxies on free loopback ports, and one deployed application."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

from moe_serving.config import AppConfig


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_app(config: AppConfig, namespace: str) -> Iterator[tuple[str, str]]:
    """Deploys `config`; yields (HTTP base URL, gRPC target); stops Serve and Ray after."""
    import ray
    from ray import serve

    from moe_serving.app import build_app
    from moe_serving.local import serve_options

    http_port, grpc_port = free_port(), free_port()
    ray.init(include_dashboard=False, log_to_driver=False, namespace=namespace)
    try:
        options = serve_options(http_port, grpc_port, host="127.0.0.1")
        serve.start(http_options=options["http_options"], grpc_options=options["grpc_options"])
        serve.run(
            build_app(config.model_dump(mode="json")),
            name=config.deployment_name,
            route_prefix="/",
            blocking=False,
        )
        yield f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
    finally:
        serve.shutdown()
        ray.shutdown()
