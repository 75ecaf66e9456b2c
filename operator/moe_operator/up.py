"""`moectl up`: make/resolve the checkpoint, plan on the CPU, and serve with Ray Serve + vLLM."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from moe_operator.api import MoEDeployment
from moe_operator.local import moe_home, prepare


def _step(message: str) -> float:
    print(f"==> {message}", flush=True)
    return time.monotonic()


def up(dep: MoEDeployment, args: argparse.Namespace) -> None:
    """Serve `dep` locally until Ctrl-C."""
    tracing: dict[str, Any] = {}
    if getattr(args, "trace_console", False):
        tracing.update(enabled=True, console=True)
    if getattr(args, "trace_file", None):
        tracing.update(enabled=True, jsonl_path=str(Path(args.trace_file).resolve()))
    t0 = _step(f"preparing {dep.metadata.name}: model {dep.spec.model.source}")
    run = prepare(
        dep,
        model_override=getattr(args, "model", None),
        tracing_overrides=tracing,
        nodes=getattr(args, "nodes", None),
    )
    print(f"    checkpoint {run.model_dir} ({time.monotonic() - t0:.1f}s)")
    print(f"    layout: {run.plan.summary}")
    for note in run.notes:
        print(f"    note: {note}")
    # Optional parsers the checkpoint's tokenizer cannot support: served without (the replica
    # does the same check before vLLM starts; moe_serving.parser_support).
    from moe_serving.parser_support import check_engine

    for reason in check_engine(run.app.engine).unavailable.values():
        print(f"    note: {reason}")
    http_port = args.http_port or dep.spec.serving.http_port
    grpc_port = args.grpc_port or dep.spec.serving.grpc_port
    log_dir = Path(args.log_dir) if getattr(args, "log_dir", None) else moe_home() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)

    from moe_serving.local import StartFailed, run_local

    # A replica over several nodes gets a local multi-node Ray cluster, one node per planned
    # node of every replica (moe_serving.local_cluster).
    nodes = run.plan.nodes_per_replica * run.plan.initial_replicas
    if nodes > 1 or run.plan.nodes_per_replica > 1:
        print(f"    local cluster: {nodes} worker nodes x {run.plan.gpus_per_node} rank(s)")
    else:
        nodes = 0
    try:
        run_local(
            run.app,
            http_port=http_port,
            grpc_port=grpc_port,
            log_dir=log_dir,
            nodes=nodes,
            ranks_per_node=run.plan.gpus_per_node,
        )
    except StartFailed as err:
        # One line with the replica's root cause, not Ray's traceback (moe_serving.failures).
        raise UpFailed(f"{dep.metadata.name} did not start: {err}") from None


class UpFailed(Exception):
    """`moectl up` could not serve; the message is one line (moectl exits non-zero)."""
