"""Ray Serve LLM's `build_openai_app` on a local checkpoint: the peer the benchmark compares with.

    python bench/raylm_app.py --config engine.json --port 8200

`engine.json` (written by systems.RayServeLLM) holds the checkpoint folder, the served name, the
vLLM engine kwargs shared by every system, and the engine environment. Fitting on 2 cores
(../shared/STACK.md): the engine's placement group has one `{CPU: 1}` bundle per TP rank, the
LLMServer replica actor and the ingress reserve 0 CPUs (they only forward; the engine's
processes do the work). Runs until SIGINT/SIGTERM, then shuts Serve and Ray down.

This uses `ray[serve]` only; `ray[llm]` must never be installed (it pins a CUDA vLLM).
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from pathlib import Path
from typing import Any


def build(config: dict[str, Any]) -> Any:
    from ray.serve.llm import LLMConfig, build_openai_app

    tp = int(config["engine_kwargs"].get("tensor_parallel_size", 1))
    gpu = config.get("device") == "gpu"
    # One bundle per engine rank: a core on the CPU, a GPU (and a core) on a GPU machine.
    bundle: dict[str, float] = {"CPU": 1, "GPU": 1} if gpu else {"CPU": 1}
    llm_config = LLMConfig(
        model_loading_config={
            "model_id": config["served_name"],
            "model_source": config["model_dir"],
        },
        accelerator_config={"kind": "gpu" if gpu else "cpu"},
        engine_kwargs=dict(config["engine_kwargs"]),
        placement_group_config={"bundles": [dict(bundle) for _ in range(tp)]},
        deployment_config={
            "num_replicas": 1,
            "ray_actor_options": {"num_cpus": 0},
            "max_ongoing_requests": int(config["engine_kwargs"].get("max_num_seqs", 32)),
        },
        runtime_env={"env_vars": dict(config.get("env") or {})},
    )
    return build_openai_app(
        {
            "llm_configs": [llm_config],
            "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0}},
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="engine.json written by systems.py")
    parser.add_argument("--port", type=int, default=8200)
    args = parser.parse_args()
    config = json.loads(Path(args.config).read_text())

    import ray
    from ray import serve

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(build(config), name="llm", route_prefix="/", blocking=False)
        print(f"ray-serve-llm ready on 127.0.0.1:{args.port}", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
