"""`make bench`: measure us against the systems a user would pick instead, on this machine.

    .venv/bin/python bench/run.py [--quick] [--only serving,ep,autoscaling,operator]

Sections, in order, one system at a time (only one engine may run on this machine):
  serving      bare vLLM (baseline), Ray Serve LLM, ours over HTTP and over gRPC: a
               concurrency sweep, streaming and not; cold start and RSS of each
  ep           ours with expert parallelism off (same model and settings) vs on
  autoscaling  ours with autoscaling 1..2: load step -> decision -> new replica serving
  operator     the operator against the Kubernetes API emulator: 1, 50, 200 MoEDeployments

A full run writes bench/RESULTS.md, bench/results.json and bench/*.png. A partial run
(`--only`, `--quick`) writes to a fresh folder under /tmp unless `--out-dir` says otherwise, so
it never replaces a full run's results. Engines are started only after checking that no other
Ray/vLLM runs on this machine (teardown uses `ray stop --force`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import report  # noqa: E402
from loadgen import GrpcClient, OpenAIClient, Summary, Tokenizer, Workload, run_load  # noqa: E402
from systems import (  # noqa: E402
    EngineSettings,
    Ours,
    RayServeLLM,
    Running,
    System,
    VllmServer,
    foreign_engines,
)

SECTIONS = ("serving", "ep", "autoscaling", "operator")
PORTS = {"vllm": 8100, "ray-serve-llm": 8200, "ours": 8300, "ours-grpc": 9300}


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Plan:
    """Sizes of the run (full or quick)."""

    def __init__(
        self,
        quick: bool,
        concurrency: list[int] | None = None,
        prompt_tokens: int = 64,
        max_tokens: int = 32,
    ) -> None:
        self.quick = quick
        self.concurrency = concurrency or [1, 4, 16]
        # Per cell: at most this many requests (2 or 4 rounds of the concurrency, >= 8 or 16)
        # and this many seconds.
        self.requests = {c: max(8, 2 * c) if quick else max(16, 4 * c) for c in self.concurrency}
        self.max_seconds = 10.0 if quick else 20.0
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.warmup = 4
        self.operator_ns = [1, 20, 50] if quick else [1, 50, 200]
        self.autoscale_idle_s = 8.0 if quick else 15.0
        self.autoscale_steady_s = 15.0 if quick else 30.0
        self.autoscale_max_step_s = 150.0 if quick else 240.0

    def workloads(self, stream: bool) -> list[Workload]:
        return [
            Workload(
                concurrency=c,
                max_requests=self.requests[c],
                max_seconds=self.max_seconds,
                prompt_words=self.prompt_tokens,
                max_tokens=self.max_tokens,
                stream=stream,
            )
            for c in self.concurrency
        ]


class Tok:
    """The checkpoint's tokenizer, counting tokens without special tokens."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(model_dir))

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self._tok.encode(text, add_special_tokens=False)
        return ids


# ---------------------------------------------------------------------------------- serving


async def sweep(
    send_factory: Callable[[Workload], Any],
    plan: Plan,
    system: str,
    streams: tuple[bool, ...] = (True, False),
) -> list[dict[str, Any]]:
    """Warm up, then every (stream, concurrency) cell; one row per cell."""
    rows = []
    warm = Workload(
        concurrency=plan.warmup,
        max_requests=plan.warmup,
        max_seconds=120,
        prompt_words=plan.prompt_tokens,
        max_tokens=plan.max_tokens,
    )
    await run_load(send_factory(warm), warm)
    for stream in streams:
        for workload in plan.workloads(stream):
            result = await run_load(send_factory(workload), workload)
            s: Summary = result.summary()
            say(
                f"  {system:14s} stream={stream!s:5s} c={workload.concurrency:<3d} "
                f"ok {s.ok}/{s.sent}  {s.output_tokens_per_s:7.1f} tok/s  "
                f"e2e p99 {s.e2e_p99_s or 0:.2f}s"
            )
            rows.append(
                {
                    "system": system,
                    "stream": stream,
                    "concurrency": workload.concurrency,
                    "summary": s.as_dict(),
                }
            )
    return rows


async def http_sweep(
    running: Running,
    model: str,
    plan: Plan,
    tok: Tokenizer,
    name: str,
    streams: tuple[bool, ...] = (True, False),
) -> list[dict[str, Any]]:
    async with OpenAIClient(running.http_url, model, tokenizer=tok) as client:
        return await sweep(client.sender, plan, name, streams)


async def grpc_sweep(
    running: Running, model: str, app: str, plan: Plan, tok: Tokenizer
) -> list[dict[str, Any]]:
    from grpc_target import InferenceAdapter, stub_factory

    assert running.grpc_address is not None
    adapter = InferenceAdapter(model, application=app)
    async with GrpcClient(running.grpc_address, stub_factory, adapter, tokenizer=tok) as client:
        return await sweep(client.sender, plan, "ours-grpc")


def memory_facts(running: Running, load_started: float) -> dict[str, Any]:
    """RSS once warm and idle (before the load), and the peak under load."""
    idle = [s for s in running.memory.samples if s.t_s <= load_started]
    peak = running.memory.peak(since_s=load_started)
    return {
        "cold_start_s": running.cold_start_s,
        "rss_idle_bytes": idle[-1].total_rss if idle else None,
        "rss_peak_bytes": peak.total_rss if peak else None,
        "rss_peak_by_role": peak.by_role if peak else {},
        "log": str(running.log_path),
        "command": " ".join(running.command),
    }


def serve_system(
    system: System,
    work: Path,
    results: dict[str, Any],
    run_sweeps: Callable[[Running], list[list[dict[str, Any]]]],
    names: list[str],
) -> None:
    """Launch one system, sweep it, record its facts; failures are recorded, not raised."""
    say(f"launching {system.name}")
    for name in names:
        results["systems"][name] = {"error": None}
    try:
        with system.launch(work) as running:
            say(f"{system.name} ready; cold start {running.cold_start_s:.1f}s")
            running.memory.now()
            load_started = running.memory.elapsed()
            for name, rows in zip(names, run_sweeps(running), strict=True):
                results["serving"].extend(rows)
                results["systems"][name] = memory_facts(running, load_started) | {"error": None}
            results["system_order"].extend(n for n in names if n not in results["system_order"])
    except Exception as err:
        say(f"{system.name} failed: {err}")
        for name in names:
            results["systems"][name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        raise


def run_serving(
    settings: EngineSettings,
    plan: Plan,
    work: Path,
    results: dict[str, Any],
    tok: Tokenizer,
    section: str,
) -> None:
    model = settings.served_name
    failures = []

    # The EP comparison streams only (3 cells), to keep the whole run near 20 minutes.
    streams = (True, False) if section == "serving" else (True,)

    def http_only(name: str) -> Callable[[Running], list[list[dict[str, Any]]]]:
        return lambda running: [asyncio.run(http_sweep(running, model, plan, tok, name, streams))]

    def ours_both(running: Running) -> list[list[dict[str, Any]]]:
        return [
            asyncio.run(http_sweep(running, model, plan, tok, "ours-http")),
            asyncio.run(grpc_sweep(running, model, "bench", plan, tok)),
        ]

    if section == "serving":
        steps: list[tuple[System, Callable[[Running], list[list[dict[str, Any]]]], list[str]]] = [
            (VllmServer("vllm", settings, PORTS["vllm"]), http_only("vllm"), ["vllm"]),
            (
                RayServeLLM("ray-serve-llm", settings, PORTS["ray-serve-llm"]),
                http_only("ray-serve-llm"),
                ["ray-serve-llm"],
            ),
            (
                Ours(
                    "ours",
                    settings,
                    PORTS["ours"],
                    grpc_port=PORTS["ours-grpc"],
                    deployment_name="bench",
                ),
                ours_both,
                ["ours-http", "ours-grpc"],
            ),
        ]
    else:  # ep: the same deployment with the experts TP-sharded instead of EP-sharded
        no_ep = EngineSettings(**{**settings.__dict__, "expert_parallel": False})
        steps = []
        if not any(row["system"] == "ours-http" for row in results["serving"]):
            # No serving section in this run: measure EP on here, for the comparison.
            steps.append(
                (
                    Ours(
                        "ours",
                        settings,
                        PORTS["ours"],
                        grpc_port=PORTS["ours-grpc"],
                        deployment_name="bench",
                    ),
                    http_only("ours-http"),
                    ["ours-http"],
                )
            )
        steps += [
            (
                Ours(
                    "ours-ep-off",
                    no_ep,
                    PORTS["ours"],
                    grpc_port=PORTS["ours-grpc"],
                    deployment_name="bench",
                ),
                http_only("ours-ep-off"),
                ["ours-ep-off"],
            ),
        ]
    if settings.device == "gpu":
        # `moectl up` plans CPU ranks (local runs); on GPUs ours runs through the operator.
        steps = [step for step in steps if not isinstance(step[0], Ours)]
        results.setdefault("notes", []).append(
            "GPU variant: ours is not launched (moectl up plans CPU ranks); on GPUs, deploy a "
            "MoEDeployment with the operator and point bench/loadgen.py at its Service."
        )
    for system, sweeps, names in steps:
        try:
            serve_system(system, work, results, sweeps, names)
        except Exception as err:
            failures.append(f"{system.name}: {type(err).__name__}: {str(err)[:200]}")
    if failures:
        raise RuntimeError("; ".join(failures))


# ------------------------------------------------------------------------------ autoscaling


AUTOSCALE_MAX_NUM_SEQS = 4


def run_autoscaling(
    settings: EngineSettings, plan: Plan, work: Path, results: dict[str, Any]
) -> None:
    import autoscale

    # Two replicas must fit on 2 cores: one rank each, no expert parallelism. The queue the
    # policy reads is requests *waiting* (router + vLLM scheduler), so the engine runs at most
    # 4 at once: 16 clients then leave ~12 waiting, well over the target of 2.
    one_rank = EngineSettings(
        **{
            **settings.__dict__,
            "tensor_parallel_size": 1,
            "expert_parallel": False,
            "max_num_seqs": AUTOSCALE_MAX_NUM_SEQS,
        }
    )
    policy = {
        "enabled": True,
        "minReplicas": 1,
        "maxReplicas": 2,
        "targetQueueDepth": 2,
        "upscaleDelaySeconds": 5,
        "downscaleDelaySeconds": 600,
    }
    system = Ours(
        "ours-autoscale",
        one_rank,
        PORTS["ours"],
        grpc_port=PORTS["ours-grpc"],
        deployment_name="bench",
        autoscaling=policy,
    )
    setup = (
        f"ours, 1 rank per replica (TP1, EP off, max_num_seqs {AUTOSCALE_MAX_NUM_SEQS}), "
        f"autoscaling {json.dumps(policy)}; "
        f"idle {plan.autoscale_idle_s:.0f}s at 1 client, then 16 clients"
    )
    results["autoscaling"] = {"setup": setup}
    say("launching ours with autoscaling")
    with system.launch(work) as running:
        results["autoscaling"]["cold_start_s"] = running.cold_start_s
        reaction = asyncio.run(
            autoscale.measure(
                running.http_url,
                settings.served_name,
                app="bench",
                workdir=work,
                idle_s=plan.autoscale_idle_s,
                steady_s=plan.autoscale_steady_s,
                max_step_s=plan.autoscale_max_step_s,
                max_tokens=plan.max_tokens * 2,
            )
        )
    results["autoscaling"]["reaction"] = reaction.as_dict()
    say(f"autoscaling: decision {reaction.decision_s}s, serving {reaction.serving_s}s")


# --------------------------------------------------------------------------------- operator


def run_operator(plan: Plan, work: Path, results: dict[str, Any]) -> None:
    import operator_scale

    points = asyncio.run(operator_scale.run_scale(plan.operator_ns, work / "operator"))
    results["operator"] = [p.as_dict() for p in points]
    errors = [f"N={p.n}: {p.error}" for p in points if p.error]
    if errors:
        raise RuntimeError("; ".join(errors))


# ------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and objects")
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated sections to run, of: {', '.join(SECTIONS)}",
    )
    parser.add_argument("--out-dir", type=Path, default=None, help="where results go")
    parser.add_argument("--work-dir", type=Path, default=None, help="logs and scratch files")
    parser.add_argument(
        "--merge-into",
        type=Path,
        default=None,
        help=(
            "re-run only the --only sections (autoscaling, operator) and replace them in the "
            "results of an earlier run in this folder (e.g. bench); RESULTS.md then says which "
            "sections were re-run, when and at which commit"
        ),
    )
    gpu = parser.add_argument_group("GPU variant (see bench/GPU.md); defaults: the CPU run")
    gpu.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    gpu.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: tiny)")
    gpu.add_argument("--served-name", default="tiny-moe")
    gpu.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks (EP = TP)")
    gpu.add_argument("--no-ep", action="store_true", help="expert parallelism off")
    gpu.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on gpu")
    gpu.add_argument("--max-model-len", type=int, default=512)
    gpu.add_argument("--max-num-seqs", type=int, default=32)
    gpu.add_argument("--concurrency", default="1,4,16", help="comma-separated sweep")
    gpu.add_argument("--prompt-tokens", type=int, default=64)
    gpu.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    try:
        args.concurrency_list = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    except ValueError:
        parser.error(
            f"--concurrency {args.concurrency!r}: use comma-separated integers, e.g. 1,4,16"
        )
    if not args.concurrency_list or min(args.concurrency_list) < 1:
        parser.error("--concurrency needs positive integers")
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in SECTIONS]
        if unknown:
            parser.error(f"unknown section(s) {', '.join(unknown)}; use {', '.join(SECTIONS)}")
        args.sections = [s for s in SECTIONS if s in wanted]
    else:
        args.sections = list(SECTIONS)
    if args.merge_into is not None:
        mixed = [s for s in args.sections if s not in MERGEABLE]
        if not args.only or mixed:
            parser.error(
                f"--merge-into re-runs whole sections: use --only with {' or '.join(MERGEABLE)}"
                " (serving and ep share tables, so re-run them with a full run)"
            )
        if not (args.merge_into / "results.json").exists():
            parser.error(f"--merge-into {args.merge_into}: no results.json there to merge into")
    return args


#: Sections whose results are self-contained (their own key in results.json).
MERGEABLE = ("autoscaling", "operator")


def merge(results: dict[str, Any], into: Path) -> dict[str, Any]:
    """The earlier run in `into` with this run's sections replaced, the re-run recorded."""
    earlier: dict[str, Any] = json.loads((into / "results.json").read_text())
    for section in results["meta"]["sections"]:
        earlier[section] = results.get(section)
        earlier["sections"][section] = results["sections"].get(section)
    machine = results["meta"]["machine"]
    earlier["meta"].setdefault("reruns", []).append(
        {
            "sections": results["meta"]["sections"],
            "command": results["meta"]["command"],
            "date": machine["date"],
            "commit": machine["commit"],
            "duration_s": results["meta"].get("duration_s"),
        }
    )
    return earlier


def _interrupt(*_: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so every launched system is torn down."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Only the default CPU run replaces bench/RESULTS.md; every variant writes elsewhere.
    full = (
        args.sections == list(SECTIONS)
        and not args.quick
        and args.device == "cpu"
        and args.model is None
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = args.out_dir or (
        BENCH if full else Path(tempfile.gettempdir()) / f"moe-bench-{stamp}"
    )
    work = args.work_dir or Path(tempfile.gettempdir()) / f"moe-bench-work-{stamp}"
    work.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _interrupt)

    plan = Plan(args.quick, args.concurrency_list, args.prompt_tokens, args.max_tokens)
    started = time.monotonic()
    results: dict[str, Any] = {
        "meta": {
            "command": report.command_line(),
            "machine": report.machine_facts(ROOT),
            "sections": args.sections,
            "quick": args.quick,
            "work_dir": str(work),
        },
        "system_order": [],
        "systems": {},
        "serving": [],
        "operator": [],
        "sections": {},
    }
    say(f"sections {', '.join(args.sections)}; results -> {out_dir}; logs -> {work}")

    engines = [s for s in args.sections if s != "operator"]
    settings: EngineSettings | None = None
    tok: Tokenizer | None = None
    if engines:
        busy = foreign_engines()
        if busy:
            reason = "another Ray/vLLM is running on this machine:\n  " + "\n  ".join(busy[:10])
            say(f"refusing to start engines: {reason}")
            for section in engines:
                results["sections"][section] = {"status": "not run", "detail": reason}
            engines = []
        else:
            if args.model is not None:
                model_dir = args.model.expanduser().resolve()
                model_text = f"checkpoint {model_dir}"
            else:
                from moe_operator.local import tiny_model_dir
                from moe_serving.tinymodel import make_model

                model_dir = Path(make_model("gemma4", tiny_model_dir("gemma4"), seed=0))
                model_text = (
                    f"tiny Gemma-4-style MoE (moe_serving.tinymodel, seed 0) at {model_dir}"
                )
            gpu = args.device == "gpu"
            settings = EngineSettings(
                model_dir=model_dir,
                served_name=args.served_name,
                dtype=args.dtype or ("bfloat16" if gpu else "float32"),
                max_model_len=args.max_model_len,
                tensor_parallel_size=args.tp,
                expert_parallel=not args.no_ep,
                enforce_eager=not gpu,
                max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=max(1024, args.max_model_len),
                device=args.device,
            )
            tok = Tok(settings.model_dir)
            results["meta"].update(
                model=model_text,
                engine=settings.engine_kwargs(),
                engine_env=settings.env(),
                workload={
                    "prompt_tokens": plan.prompt_tokens,
                    "max_tokens": plan.max_tokens,
                    "concurrency": plan.concurrency,
                    "requests": plan.requests,
                    "max_seconds": plan.max_seconds,
                    "warmup": plan.warmup,
                },
            )

    try:
        for section in args.sections:
            if section in results["sections"]:
                continue
            say(f"== {section}")
            t0 = time.monotonic()
            try:
                if section in ("serving", "ep"):
                    assert settings is not None and tok is not None
                    run_serving(settings, plan, work, results, tok, section)
                elif section == "autoscaling":
                    assert settings is not None
                    run_autoscaling(settings, plan, work, results)
                else:
                    run_operator(plan, work, results)
                results["sections"][section] = {
                    "status": "ok",
                    "detail": f"{time.monotonic() - t0:.0f} s",
                }
            except KeyboardInterrupt:
                results["sections"][section] = {"status": "interrupted", "detail": ""}
                raise
            except Exception as err:
                traceback.print_exc()
                if section == "autoscaling" and "autoscaling" in results:
                    results["autoscaling"]["error"] = f"{type(err).__name__}: {err}"
                results["sections"][section] = {
                    "status": "failed",
                    "detail": f"{type(err).__name__}: {err}",
                }
    finally:
        results["meta"]["duration_s"] = time.monotonic() - started
        if args.merge_into is not None:
            results, out_dir = merge(results, args.merge_into), args.merge_into
        path = report.write(results, out_dir)
        say(f"wrote {path} ({results['meta']['duration_s']:.0f} s)")
    failed = [s for s, info in results["sections"].items() if info["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
