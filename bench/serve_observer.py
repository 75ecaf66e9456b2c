"""Prints the replica states of a running Ray Serve application as JSON lines (a subprocess).

    python bench/serve_observer.py --namespace moe-local --app bench --interval 0.25

Connects to the Ray cluster already running on this machine (`address="auto"`; it starts no
cluster of its own) and polls `serve.status()`: one line per poll with the time and, per
deployment, the replica counts by state, the status and its message ("Upscaling from 1 to 2
replicas." is the autoscaler's decision). autoscale.py reads these lines.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--namespace", default="moe-local")
    parser.add_argument("--app", required=True)
    parser.add_argument("--interval", type=float, default=0.25)
    args = parser.parse_args()

    import ray
    from ray import serve

    ray.init(address="auto", namespace=args.namespace, log_to_driver=False)
    while True:
        line: dict[str, object] = {"t": time.time()}
        try:
            app = serve.status().applications.get(args.app)
            if app is not None:
                line["deployments"] = {
                    name: {
                        "replicas": {
                            getattr(k, "value", str(k)): int(v) for k, v in d.replica_states.items()
                        },
                        "status": str(d.status),
                        "message": d.message,
                    }
                    for name, d in app.deployments.items()
                }
        except Exception as err:  # the cluster is going away: say so and keep polling
            line["error"] = f"{type(err).__name__}: {err}"
        print(json.dumps(line), flush=True)
        time.sleep(args.interval)


if __name__ == "__main__":
    main()
