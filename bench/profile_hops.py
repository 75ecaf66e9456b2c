"""Where the milliseconds of one request go, hop by hop (bench/PROFILE.md).

Starts ours (`moectl up`, tiny Gemma-4-style MoE, CPU) with `MOE_HOP_LOG` set, so the ingress and
the engine replica append a timestamp at each hop (`moe_serving.hops`), then sends requests one
at a time per mode (HTTP and gRPC, streaming and not) and records the client's own times
(send, each chunk, end). Every process runs on this machine, so `time.time_ns()` is one clock.
Then the same requests against bare vLLM's OpenAI server (same checkpoint and engine settings)
for the baseline TTFT / end-to-end.

    flock /tmp/ray.lock env PYTHONPATH=operator:serving .venv/bin/python bench/profile_hops.py

Prints the per-hop medians (milliseconds) as a Markdown table and writes the raw numbers to
`--out` (JSON). `--skip-vllm` skips the baseline launch.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from systems import EngineSettings, Ours, VllmServer, foreign_engines  # noqa: E402

MODES = ("http", "http-stream", "grpc", "grpc-stream")

Marks = list[tuple[int, str, int]]  # (time_ns, hop, n)


# ------------------------------------------------------------------------------------- clients


def _body(index: int, max_tokens: int, model: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "prompt": f"w{index} the river runs past the old mill and",
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    if stream:
        body["stream"] = True
    return body


def http_request(client: Any, url: str, body: dict[str, Any]) -> Marks:
    """One request on `client` (an `http.client.HTTPConnection` kept alive, as gRPC's channel;
    the standard library's reader: each SSE line is timed when it is read off the socket)."""
    payload = json.dumps(body).encode()
    marks: Marks = [(time.time_ns(), "client.send", 0)]
    client.request(
        "POST", "/v1/completions", body=payload, headers={"Content-Type": "application/json"}
    )
    response = client.getresponse()
    assert response.status == 200, response.read()
    if not body.get("stream"):
        json.loads(response.read())
        marks.append((time.time_ns(), "client.end", 0))
        return marks
    n = 0
    while line := response.readline():
        if line.startswith(b"data:"):
            marks.append((time.time_ns(), "client.chunk", n))
            n += 1
    marks.append((time.time_ns(), "client.end", 0))
    return marks


def grpc_request(stub: Any, body: dict[str, Any], app: str) -> Marks:
    from moe_serving.proto import inference_pb2 as pb

    request = pb.CompleteRequest(
        model=body["model"],
        prompt=body["prompt"],
        sampling=pb.SamplingParams(max_tokens=body["max_tokens"], temperature=0.0, ignore_eos=True),
    )
    metadata = (("application", app),)
    marks: Marks = [(time.time_ns(), "client.send", 0)]
    if not body.get("stream"):
        stub.Complete(request, metadata=metadata, timeout=120)
    else:
        stream = stub.Generate(pb.GenerateRequest(completion=request), metadata=metadata)
        for n, _chunk in enumerate(stream):
            marks.append((time.time_ns(), "client.chunk", n))
    marks.append((time.time_ns(), "client.end", 0))
    return marks


# ------------------------------------------------------------------------------------ analysis


def read_hops(prefix: str) -> Marks:
    marks: Marks = []
    folder, stem = os.path.split(prefix)
    for name in os.listdir(folder):
        if name.startswith(stem + "."):
            for line in Path(folder, name).read_text().splitlines():
                at, hop, n = line.split()
                marks.append((int(at), hop, int(n)))
    marks.sort()
    return marks


def assign(requests: list[Marks], server: Marks) -> list[dict[str, list[int]]]:
    """Each server mark goes to the request whose [send, next send) window holds it."""
    out: list[dict[str, list[int]]] = []
    sends = [r[0][0] for r in requests] + [sys.maxsize]
    for i, client in enumerate(requests):
        hops: dict[str, list[int]] = defaultdict(list)
        for at, hop, _ in client:
            hops[hop].append(at)
        for at, hop, _ in server:
            if sends[i] <= at < sends[i + 1] or (
                hop.startswith("vllm.") and sends[i] <= at <= client[-1][0]
            ):
                hops[hop].append(at)
        for values in hops.values():
            values.sort()
        out.append(dict(hops))
    return out


def _ms(a: int | None, b: int | None) -> float | None:
    return None if a is None or b is None else (b - a) / 1e6


def _first(h: dict[str, list[int]], hop: str, i: int = 0) -> int | None:
    values = h.get(hop, [])
    return values[i] if len(values) > i else None


def _last(h: dict[str, list[int]], hop: str) -> int | None:
    values = h.get(hop, [])
    return values[-1] if values else None


#: (row name, function of one request's hops -> ms); non-streaming.
UNARY_ROWS: list[tuple[str, Callable[[dict[str, list[int]]], float | None]]] = [
    (
        "client -> ingress (Serve proxy + hop 1)",
        lambda h: _ms(_first(h, "client.send"), _first(h, "ingress.in")),
    ),
    (
        "ingress: our checks, parse",
        lambda h: _ms(_first(h, "ingress.in"), _first(h, "ingress.call")),
    ),
    (
        "ingress -> engine replica (hop 2)",
        lambda h: _ms(_first(h, "ingress.call"), _first(h, "engine.in")),
    ),
    (
        "engine: validation, admission, vLLM preprocessing",
        lambda h: _ms(_first(h, "engine.in"), _first(h, "vllm.generate")),
    ),
    (
        "vLLM generate (all tokens)",
        lambda h: _ms(_first(h, "vllm.generate"), _last(h, "vllm.output")),
    ),
    (
        "  of which vLLM arrival -> first token",
        lambda h: _ms(_first(h, "vllm.arrival"), _first(h, "vllm.first_token")),
    ),
    (
        "engine: response body (vLLM OpenAI layer)",
        lambda h: _ms(_last(h, "vllm.output"), _last(h, "engine.yield")),
    ),
    (
        "engine -> ingress (head + body back)",
        lambda h: _ms(_last(h, "engine.yield"), _first(h, "ingress.body")),
    ),
    (
        "ingress: response (JSON / protobuf)",
        lambda h: _ms(_first(h, "ingress.body"), _first(h, "ingress.out")),
    ),
    (
        "ingress -> client (hop 1 back + Serve proxy)",
        lambda h: _ms(_first(h, "ingress.out"), _first(h, "client.end")),
    ),
    ("total at the client", lambda h: _ms(_first(h, "client.send"), _first(h, "client.end"))),
    (
        "outside vLLM generate (total - generate)",
        lambda h: (
            None
            if _ms(_first(h, "vllm.generate"), _last(h, "vllm.output")) is None
            else _ms(_first(h, "client.send"), _first(h, "client.end"))
            - _ms(_first(h, "vllm.generate"), _last(h, "vllm.output"))
        ),
    ),  # type: ignore[operator]
]


def _chunk_transit(h: dict[str, list[int]], a: str, a_off: int, b: str) -> float | None:
    """Median over chunks k of (b[k] - a[k + a_off]) in ms (chunks matched by index)."""
    xs, ys = h.get(a, [])[a_off:], h.get(b, [])
    n = min(len(xs), len(ys)) - 1  # the last events differ by kind ([DONE], usage)
    if n < 2:
        return None
    return statistics.median((ys[k] - xs[k]) / 1e6 for k in range(1, n))


STREAM_ROWS: list[tuple[str, Callable[[dict[str, list[int]]], float | None]]] = [
    (
        "client -> ingress (Serve proxy + hop 1)",
        lambda h: _ms(_first(h, "client.send"), _first(h, "ingress.in")),
    ),
    (
        "ingress: our checks, parse",
        lambda h: _ms(_first(h, "ingress.in"), _first(h, "ingress.call")),
    ),
    (
        "ingress -> engine replica (hop 2)",
        lambda h: _ms(_first(h, "ingress.call"), _first(h, "engine.in")),
    ),
    (
        "engine: validation, admission, vLLM preprocessing",
        lambda h: _ms(_first(h, "engine.in"), _first(h, "vllm.generate")),
    ),
    (
        "vLLM generate -> first output",
        lambda h: _ms(_first(h, "vllm.generate"), _first(h, "vllm.output")),
    ),
    (
        "  of which vLLM arrival -> first token",
        lambda h: _ms(_first(h, "vllm.arrival"), _first(h, "vllm.first_token")),
    ),
    (
        "first output -> engine yields it (SSE formatting)",
        lambda h: _ms(_first(h, "vllm.output"), _first(h, "engine.yield", 1)),
    ),
    (
        "engine yield -> ingress gets it (hop 2 back), per chunk",
        lambda h: _chunk_transit(h, "engine.yield", 1, "ingress.chunk"),
    ),
    (
        "ingress gets -> client gets (ingress + hop 1 back + proxy), per chunk",
        lambda h: _chunk_transit(h, "ingress.chunk", 0, "client.chunk"),
    ),
    (
        "vLLM output -> client, per chunk",
        lambda h: _chunk_transit(h, "vllm.output", 0, "client.chunk"),
    ),
    (
        "client TTFT (first chunk)",
        lambda h: _ms(_first(h, "client.send"), _first(h, "client.chunk")),
    ),
    (
        "client TTFT - vLLM arrival->first token",
        lambda h: (
            None
            if _ms(_first(h, "vllm.arrival"), _first(h, "vllm.first_token")) is None
            else _ms(_first(h, "client.send"), _first(h, "client.chunk"))
            - _ms(_first(h, "vllm.arrival"), _first(h, "vllm.first_token"))
        ),
    ),  # type: ignore[operator]
    (
        "vLLM last output -> client end",
        lambda h: _ms(_last(h, "vllm.output"), _first(h, "client.end")),
    ),
    ("total at the client", lambda h: _ms(_first(h, "client.send"), _first(h, "client.end"))),
]


def medians(per_request: list[dict[str, list[int]]], rows: Any) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, fn in rows:
        values = [v for v in (fn(h) for h in per_request) if v is not None]
        out[name] = round(statistics.median(values), 2) if values else None
    return out


# ----------------------------------------------------------------------------------------- run


def run_ours(settings: EngineSettings, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import grpc

    from moe_serving.proto import inference_pb2_grpc as rpc

    prefix = str(work / "hops" / "hop")
    (work / "hops").mkdir(parents=True)
    pythonpath = f"{ROOT / 'operator'}{os.pathsep}{ROOT / 'serving'}"
    ours = Ours(
        name="ours",
        settings=settings,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        extra_env={"MOE_HOP_LOG": prefix, "PYTHONPATH": pythonpath},
    )
    results: dict[str, Any] = {}
    with ours.launch(work / "ours") as running:
        channel = grpc.insecure_channel(running.grpc_address)
        stub = rpc.InferenceServiceStub(channel)
        conn = http.client.HTTPConnection("127.0.0.1", ours.http_port, timeout=120)
        send = {
            "http": lambda b: http_request(conn, running.http_url, b),
            "http-stream": lambda b: http_request(conn, running.http_url, b),
            "grpc": lambda b: grpc_request(stub, b, ours.deployment_name),
            "grpc-stream": lambda b: grpc_request(stub, b, ours.deployment_name),
        }
        client: dict[str, list[Marks]] = {}
        index = 0
        for mode in MODES:
            stream = mode.endswith("stream")
            for _ in range(args.warmup):
                send[mode](_body(index, args.max_tokens, settings.served_name, stream))
                index += 1
            client[mode] = []
            for _ in range(args.requests):
                client[mode].append(
                    send[mode](_body(index, args.max_tokens, settings.served_name, stream))
                )
                index += 1
                time.sleep(args.gap_s)
        channel.close()
        conn.close()
    server = read_hops(prefix)
    for mode in MODES:
        per_request = assign(client[mode], server)
        rows = STREAM_ROWS if mode.endswith("stream") else UNARY_ROWS
        results[mode] = {
            "medians_ms": medians(per_request, rows),
            "requests": per_request,
        }
    return results


def run_vllm(settings: EngineSettings, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", args.http_port, timeout=120)
    vllm = VllmServer(name="vllm", settings=settings, http_port=args.http_port)
    out: dict[str, Any] = {}
    index = 0
    with vllm.launch(work / "vllm") as running:
        for mode in ("http", "http-stream"):
            stream = mode.endswith("stream")
            for _ in range(args.warmup):
                http_request(
                    conn,
                    running.http_url,
                    _body(index, args.max_tokens, settings.served_name, stream),
                )
                index += 1
            totals, ttfts, raw = [], [], []
            for _ in range(args.requests):
                marks = http_request(
                    conn,
                    running.http_url,
                    _body(index, args.max_tokens, settings.served_name, stream),
                )
                index += 1
                h: dict[str, list[int]] = defaultdict(list)
                for at, hop, _ in marks:
                    h[hop].append(at)
                raw.append(dict(h))
                totals.append(_ms(h["client.send"][0], h["client.end"][0]))
                if stream:
                    ttfts.append(_ms(h["client.send"][0], h["client.chunk"][0]))
                time.sleep(args.gap_s)
            out[mode] = {
                "total_ms": round(statistics.median(totals), 2),  # type: ignore[type-var]
                "ttft_ms": round(statistics.median(ttfts), 2) if ttfts else None,  # type: ignore[type-var]
                "requests": raw,
            }
    return out


def table(results: dict[str, Any]) -> str:
    lines = []
    for kind, rows, modes in (
        ("non-streaming", UNARY_ROWS, ("http", "grpc")),
        ("streaming", STREAM_ROWS, ("http-stream", "grpc-stream")),
    ):
        lines.append(f"\n{kind} (median ms over {results['meta']['requests']} requests)\n")
        lines.append("| hop | " + " | ".join(modes) + " |")
        lines.append("|---|" + "---|" * len(modes))
        for name, _ in rows:
            cells = [results["ours"][m]["medians_ms"].get(name) for m in modes]
            text = ["-" if c is None else f"{c:.2f}" for c in cells]
            lines.append(f"| {name} | " + " | ".join(text) + " |")
    if "vllm" in results:
        v = results["vllm"]
        lines.append("\nbare vLLM OpenAI server, same requests (median ms)\n")
        lines.append("| mode | total | TTFT |")
        lines.append("|---|---|---|")
        for m in ("http", "http-stream"):
            lines.append(f"| {m} | {v[m]['total_ms']} | {v[m]['ttft_ms'] or '-'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--gap-s", type=float, default=0.05)
    parser.add_argument("--http-port", type=int, default=18000)
    parser.add_argument("--grpc-port", type=int, default=19000)
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import psutil

    foreign = foreign_engines({p.pid for p in psutil.Process().parents()})
    if foreign:
        print("another engine / Ray is running; not starting:\n  " + "\n  ".join(foreign))
        return 2
    from moe_operator.local import tiny_model_dir
    from moe_serving.tinymodel import make_model

    model_dir = Path(make_model("gemma4", tiny_model_dir("gemma4"), seed=0))
    settings = EngineSettings(
        model_dir=model_dir, tensor_parallel_size=args.tp, expert_parallel=args.tp > 1
    )
    work = Path(tempfile.mkdtemp(prefix="moe-profile-"))
    results: dict[str, Any] = {
        "meta": {
            "requests": args.requests,
            "max_tokens": args.max_tokens,
            "tp": args.tp,
            "commit": os.popen(f"git -C {ROOT} rev-parse --short HEAD").read().strip(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
    }
    started = time.monotonic()
    results["ours"] = run_ours(settings, args, work)
    if not args.skip_vllm:
        results["vllm"] = run_vllm(settings, args, work)
    results["meta"]["wall_s"] = round(time.monotonic() - started, 1)
    print(table(results))
    out = args.out or work / "profile.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"\nraw: {out} (logs under {work})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
