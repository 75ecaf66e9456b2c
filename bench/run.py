"""`make bench`: measure us against the systems a user would pick instead, on this machine.

    .venv/bin/python -m bench.run [--quick] [--only serving,ep,autoscaling,operator,roofline]

Sections, in order, one system at a time (only one engine may run on this machine):
  serving      bare vLLM (baseline), Ray Serve LLM, ours over HTTP and over gRPC: a
               concurrency sweep, streaming and not, in rounds (5; --quick 2; --rounds N):
               each round launches every system in turn, in an order rotated per round, and
               runs all its cells; ratios get bootstrap intervals over rounds (stats.py).
               Per cell: throughput, TTFT/E2E, failed requests with their errors, and the CPU
               seconds of the system's whole process tree; per launch: cold start and RSS
  ep           ours with expert parallelism off (same model and settings) vs on
  autoscaling  ours with autoscaling 1..2: load step -> decision -> new replica serving
  operator     the operator against the Kubernetes API emulator: 1, 50, 200 MoEDeployments
  agents       agent sessions (long per-session prefix, growing history) and a control with no
               shared prefix, over 2 engine replicas: our prefix-affinity router vs Serve's
               default (power of two choices), in rotated rounds (bench/agents.py)
  roofline     the planner's decode roofline vs vLLM's measured decode rate on this CPU, with
               the memory bandwidth a probe measures here (bench/roofline.py)

A full run writes bench/RESULTS.md, bench/results.json and bench/*.png. A partial run
(`--only`, `--quick`) writes to a fresh folder under /tmp unless `--out-dir` says otherwise, so
it never replaces a full run's results. Engines are started only after checking that no other
Ray/vLLM runs on this machine (teardown uses `ray stop --force`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import report, stats
from .loadgen import (
    GrpcClient,
    OpenAIClient,
    Sender,
    Tokenizer,
    Workload,
    run_load,
)
from .systems import (
    CpuMeter,
    EngineSettings,
    Ours,
    RayServeLLM,
    Running,
    System,
    VllmServer,
    foreign_engines,
)

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# No model hub: the checkpoints are local (before anything imports transformers).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SECTIONS = ("serving", "ep", "autoscaling", "agents", "operator", "roofline")
PORTS = {"vllm": 8100, "ray-serve-llm": 8200, "ours": 8300, "ours-grpc": 9300}


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def cell_requests(concurrency: int, quick: bool) -> int:
    """Requests per cell and round: ~60 at concurrency 16 for a stable p50, fewer at 1."""
    if quick:
        return max(4, 2 * concurrency, min(3 * concurrency, 12))
    return max(10, 4 * concurrency, min(6 * concurrency, 24))


#: Rough costs on the 2-core machine (RESULTS.md of the single-round run, 2026-11): launch to
#: first token plus teardown, and seconds per request at concurrency 1. Only for the estimate
#: printed at the start; nothing is measured with them.
START_COST_S = {"vllm": 50.0, "ray-serve-llm": 120.0, "ours": 75.0}
SECONDS_PER_REQUEST_C1 = 0.9


class Plan:
    """Sizes of the run (full or quick)."""

    def __init__(
        self,
        quick: bool,
        concurrency: list[int] | None = None,
        prompt_tokens: int = 64,
        max_tokens: int = 32,
        rounds: int | None = None,
    ) -> None:
        self.quick = quick
        self.concurrency = concurrency or [1, 4, 16]
        # Rounds of the serving sweep: every system measured once per round, in rotated order.
        self.rounds = rounds if rounds is not None else (2 if quick else 5)
        if self.rounds < 1:
            raise ValueError("at least one round")
        # Per cell and round: at most this many requests and this many seconds.
        self.requests = {c: cell_requests(c, quick) for c in self.concurrency}
        self.max_seconds = 10.0 if quick else 30.0
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.warmup = 4
        self.operator_ns = [1, 20, 50] if quick else [1, 50, 200]
        self.autoscale_idle_s = 8.0 if quick else 15.0
        self.autoscale_steady_s = 15.0 if quick else 30.0
        self.autoscale_max_step_s = 150.0 if quick else 240.0
        # Agents: rounds of (router on, router off), rotated; R rounds take R + 1 launches.
        self.agent_rounds = 2 if quick else 3

    def workload(self, concurrency: int, stream: bool) -> Workload:
        return Workload(
            concurrency=concurrency,
            max_requests=self.requests[concurrency],
            max_seconds=self.max_seconds,
            prompt_words=self.prompt_tokens,
            max_tokens=self.max_tokens,
            stream=stream,
        )

    def cells(self, streams: tuple[bool, ...]) -> list[tuple[bool, int]]:
        return [(stream, c) for stream in streams for c in self.concurrency]

    def estimate_serving_s(self, targets: dict[str, int]) -> float:
        """Rough duration of the serving rounds: starts plus load (see START_COST_S)."""
        orders = stats.round_orders(list(targets), self.rounds)
        starts = sum(START_COST_S.get(g.system, 75.0) for g in stats.launch_groups(orders))
        per_cell = 0.0
        for c in self.concurrency:
            # Closed loop: a request takes ~0.9 s alone and the engine batches up to ~16.
            speedup = min(c, 6.0)
            per_cell += min(self.max_seconds, self.requests[c] * SECONDS_PER_REQUEST_C1 / speedup)
        cells = 2 * per_cell  # streaming and not
        return starts + self.rounds * cells * sum(targets.values())


class Tok:
    """The checkpoint's tokenizer, counting tokens without special tokens."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(model_dir))

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self._tok.encode(text, add_special_tokens=False)
        return ids


# ---------------------------------------------------------------------------------- serving

SenderFactory = Callable[[Workload], Sender]
#: Opens a client for one target of a running system (closed with the stack); result: senders.
Opener = Callable[[Running, contextlib.AsyncExitStack], Awaitable[SenderFactory]]


def http_opener(model: str, tok: Tokenizer | None) -> Opener:
    async def open_(running: Running, stack: contextlib.AsyncExitStack) -> SenderFactory:
        client = await stack.enter_async_context(
            OpenAIClient(running.http_url, model, tokenizer=tok)
        )
        return client.sender

    return open_


def grpc_opener(model: str, app: str, tok: Tokenizer | None) -> Opener:
    async def open_(running: Running, stack: contextlib.AsyncExitStack) -> SenderFactory:
        from .grpc_target import InferenceAdapter, stub_factory

        assert running.grpc_address is not None
        adapter = InferenceAdapter(model, application=app)
        client = await stack.enter_async_context(
            GrpcClient(running.grpc_address, stub_factory, adapter, tokenizer=tok)
        )
        return client.sender

    return open_


@dataclass
class Step:
    """One system to launch, and the targets (result names) measured on each launch of it."""

    system: System
    targets: dict[str, Opener]
    streams: tuple[bool, ...] = (True, False)


async def measure_cell(
    send_factory: SenderFactory, workload: Workload, cpu: CpuMeter
) -> dict[str, Any]:
    """One cell: the load, its summary, every failure, and the tree's CPU seconds meanwhile."""
    before = cpu.sample()
    result = await run_load(send_factory(workload), workload)
    cpu_s = cpu.sample() - before
    tokens = result.output_tokens()
    return {
        "summary": result.summary().as_dict(),
        "output_tokens": tokens,
        "cpu_s": cpu_s,
        "cpu_s_per_1k_tokens": cpu_s / tokens * 1000 if tokens else None,
        "failures": result.failures(),
    }


async def warm_up(running: Running, step: Step, plan: Plan) -> None:
    """A few requests through every target of a fresh launch (not measured)."""
    warm = Workload(
        concurrency=plan.warmup,
        max_requests=plan.warmup,
        max_seconds=120,
        prompt_words=plan.prompt_tokens,
        max_tokens=plan.max_tokens,
    )
    async with contextlib.AsyncExitStack() as stack:
        for opener in step.targets.values():
            send_factory = await opener(running, stack)
            await run_load(send_factory(warm), warm)


async def visit(
    running: Running, step: Step, plan: Plan, round_no: int, launch_no: int, section: str
) -> list[dict[str, Any]]:
    """One system's turn in one round: every cell, every target, in rotated orders.

    The cells start at a different one each round, and a system with several targets (ours:
    HTTP and gRPC) alternates which goes first, cell by cell, so neither always runs first.
    """
    rows = []
    cpu = running.memory.cpu
    async with contextlib.AsyncExitStack() as stack:
        senders = {name: await opener(running, stack) for name, opener in step.targets.items()}
        cells = stats.rotate(plan.cells(step.streams), round_no)
        for i, (stream, conc) in enumerate(cells):
            workload = plan.workload(conc, stream)
            for name in stats.rotate(list(senders), round_no + i):
                measured = await measure_cell(senders[name], workload, cpu)
                s = measured["summary"]
                per_k = measured["cpu_s_per_1k_tokens"]
                say(
                    f"  r{round_no} {name:14s} stream={stream!s:5s} c={conc:<3d} "
                    f"ok {s['ok']}/{s['sent']}  {s['output_tokens_per_s']:7.1f} tok/s  "
                    f"e2e p50 {s['e2e_p50_s'] or 0:.2f}s  "
                    f"cpu {'-' if per_k is None else f'{per_k:.1f}'} s/1k tok"
                )
                rows.append(
                    {
                        "section": section,
                        "system": name,
                        "stream": stream,
                        "concurrency": conc,
                        "round": round_no,
                        "launch": launch_no,
                        **measured,
                    }
                )
    return rows


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


def run_launch(
    step: Step,
    rounds: tuple[int, ...],
    plan: Plan,
    work: Path,
    results: dict[str, Any],
    section: str,
) -> None:
    """Launch one system, warm it up, run its visits in `rounds`, record the launch's facts.

    Failures are recorded on the launch (rows of the rounds done so far are kept), then raised.
    """
    system = step.system
    launch_no = len(results["launches"])
    record: dict[str, Any] = {
        "launch": launch_no,
        "section": section,
        "system": system.name,
        "targets": list(step.targets),
        "rounds": list(rounds),
        "rounds_done": [],
        "error": None,
    }
    results["launches"].append(record)
    say(f"launch {launch_no}: {system.name} for round(s) {', '.join(str(r) for r in rounds)}")
    try:
        with system.launch(work / f"launch-{launch_no:02d}-{system.name}") as running:
            say(f"{system.name} ready; cold start {running.cold_start_s:.1f}s")
            record["cold_start_s"] = running.cold_start_s
            running.memory.now()
            load_started = running.memory.elapsed()
            asyncio.run(warm_up(running, step, plan))
            for r in rounds:
                results["serving"].extend(
                    asyncio.run(visit(running, step, plan, r, launch_no, section))
                )
                record["rounds_done"].append(r)
            record.update(memory_facts(running, load_started))
        record["teardown"] = running.facts.get("teardown", [])
    except Exception as err:
        say(f"{system.name} failed: {err}")
        record["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        raise


def run_rounds(
    steps: dict[str, Step],
    orders: list[list[str]],
    plan: Plan,
    work: Path,
    results: dict[str, Any],
    section: str,
) -> list[str]:
    """Every round's visits in order; a system continuing into the next round stays up.

    Returns the failures (a failed launch loses its rounds, the others still run).
    """
    for step in steps.values():
        for name in step.targets:
            if name not in results["system_order"]:
                results["system_order"].append(name)
    groups = stats.launch_groups(orders)
    results.setdefault("rounds", {})[section] = {
        "orders": [[steps[key].system.name for key in order] for order in orders],
        "launches": [[steps[g.system].system.name, list(g.rounds)] for g in groups],
    }
    failures = []
    for group in groups:
        try:
            run_launch(steps[group.system], group.rounds, plan, work, results, section)
        except Exception as err:
            failures.append(f"{steps[group.system].system.name}: {type(err).__name__}: {err}")
    return failures


def run_serving(
    settings: EngineSettings,
    plan: Plan,
    work: Path,
    results: dict[str, Any],
    tok: Tokenizer,
    section: str,
) -> None:
    model = settings.served_name
    http = http_opener(model, tok)

    def ours(name: str, s: EngineSettings, targets: dict[str, Opener], **kw: Any) -> Step:
        system = Ours(name, s, PORTS["ours"], grpc_port=PORTS["ours-grpc"], deployment_name="bench")
        return Step(system, targets, **kw)

    if section == "serving":
        steps = {
            "vllm": Step(VllmServer("vllm", settings, PORTS["vllm"]), {"vllm": http}),
            "ray-serve-llm": Step(
                RayServeLLM("ray-serve-llm", settings, PORTS["ray-serve-llm"]),
                {"ray-serve-llm": http},
            ),
            "ours": ours(
                "ours",
                settings,
                {"ours-http": http, "ours-grpc": grpc_opener(model, "bench", tok)},
            ),
        }
        rounds = plan.rounds
    else:  # ep: the same deployment with the experts TP-sharded instead of EP-sharded; 1 round
        no_ep = EngineSettings(**{**settings.__dict__, "expert_parallel": False})
        steps = {}
        if not any(row["system"] == "ours-http" for row in results["serving"]):
            # No serving section in this run: measure EP on here, for the comparison.
            steps["ours"] = ours("ours", settings, {"ours-http": http}, streams=(True,))
        steps["ours-ep-off"] = ours("ours-ep-off", no_ep, {"ours-ep-off": http}, streams=(True,))
        rounds = 1
    if settings.device == "gpu":
        # `moectl up` plans CPU ranks (local runs); on GPUs ours runs through the operator.
        steps = {k: v for k, v in steps.items() if not isinstance(v.system, Ours)}
        results.setdefault("notes", []).append(
            "GPU variant: ours is not launched (moectl up plans CPU ranks); on GPUs, deploy a "
            "MoEDeployment with the operator and point bench/loadgen.py at its Service."
        )
    if not steps:
        return
    if section == "serving":
        estimate = plan.estimate_serving_s({k: len(v.targets) for k, v in steps.items()})
        say(f"{rounds} round(s); estimated {estimate / 60:.0f} min for the serving rounds")
    orders = stats.round_orders(list(steps), rounds)
    failures = run_rounds(steps, orders, plan, work, results, section)
    if failures:
        raise RuntimeError("; ".join(failures))


# ------------------------------------------------------------------------------ autoscaling


AUTOSCALE_MAX_NUM_SEQS = 4


def run_autoscaling(
    settings: EngineSettings, plan: Plan, work: Path, results: dict[str, Any]
) -> None:
    from . import autoscale

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


# ----------------------------------------------------------------------------------- agents


AGENT_ROUTERS = {"affinity": "on", "default": "off"}


def run_agents(
    settings: EngineSettings, plan: Plan, work: Path, results: dict[str, Any], tok: Tokenizer
) -> None:
    """Our prefix-affinity router vs Serve's default, 2 engine replicas of one rank each."""
    from . import agents

    shape = agents.AgentWorkload()
    one_rank = EngineSettings(
        **{
            **settings.__dict__,
            "tensor_parallel_size": 1,
            "expert_parallel": False,
            # A session's prompt plus its history; the tiny model takes 2048 positions.
            "max_model_len": 1024,
        }
    )
    systems = {
        name: Ours(
            f"ours-{name}",
            one_rank,
            PORTS["ours"],
            grpc_port=PORTS["ours-grpc"],
            deployment_name="bench",
            spec={"replicas": 2, "serving": {"prefixAffinity": mode}},
        )
        for name, mode in AGENT_ROUTERS.items()
    }
    orders = stats.round_orders(list(systems), plan.agent_rounds)
    section: dict[str, Any] = {
        "setup": (
            f"ours, 2 engine replicas of 1 rank each (TP1, EP off, max_model_len 1024), "
            f"prefixAffinity on (affinity) vs off (default); {shape.sessions} concurrent "
            f"sessions x {shape.turns} turns, system prompt {shape.instruction_tokens} tokens + "
            f"{len(agents.TOOLS)} tool definitions, {shape.max_tokens} output tokens per call; "
            f"control: as many calls, same sizes, no shared prefix; "
            f"{plan.agent_rounds} rounds, orders {orders}"
        ),
        "rounds": {},
        "launches": [],
    }
    results["agents"] = section
    for group in stats.launch_groups(orders):
        system = systems[group.system]
        say(f"agents: launch {group.system} for round(s) {', '.join(map(str, group.rounds))}")
        with system.launch(work / f"agents-{len(section['launches'])}-{group.system}") as running:
            section["launches"].append(
                {
                    "system": group.system,
                    "rounds": list(group.rounds),
                    "cold_start_s": running.cold_start_s,
                }
            )
            agents.wait_replicas(running.http_url, 2, timeout_s=300.0)
            for r in group.rounds:
                # Which of the two workloads goes first alternates by round.
                kinds = ["agent", "control"] if r % 2 == 0 else ["control", "agent"]
                for kind in kinds:
                    run = asyncio.run(
                        agents.run(
                            running.http_url,
                            settings.served_name,
                            shape,
                            tok,
                            label=f"r{r}-{group.system}-{kind}",
                            control=kind == "control",
                        )
                    )
                    row = run.as_dict()
                    section["rounds"].setdefault(str(r), {}).setdefault(group.system, {})[kind] = (
                        row
                    )
                    hit = row["prefix_cache_hit_rate"]
                    say(
                        f"  r{r} {group.system:9s} {kind:8s} ok {row['ok']}/{row['sent']}  "
                        f"TTFT p50 {row['ttft_p50_s'] or 0:.3f}s "
                        f"p99 {row['ttft_p99_s'] or 0:.3f}s  "
                        f"{row['output_tokens_per_s']:.1f} tok/s  "
                        f"hit rate {'-' if hit is None else f'{hit:.2f}'}  "
                        f"decisions {row['routing_decisions'] or '-'}"
                    )
    failed = [
        f"r{r} {system} {kind}: {row['failed']} failed ({row['errors']})"
        for r, by_system in section["rounds"].items()
        for system, by_kind in by_system.items()
        for kind, row in by_kind.items()
        if row["failed"]
    ]
    if failed:
        raise RuntimeError("; ".join(failed))


# --------------------------------------------------------------------------------- operator


def run_operator(plan: Plan, work: Path, results: dict[str, Any]) -> None:
    from . import operator_scale

    points = asyncio.run(operator_scale.run_scale(plan.operator_ns, work / "operator"))
    results["operator"] = [p.as_dict() for p in points]
    errors = [f"N={p.n}: {p.error}" for p in points if p.error]
    if errors:
        raise RuntimeError("; ".join(errors))


# --------------------------------------------------------------------------------- roofline


def run_roofline(settings: EngineSettings, work: Path, results: dict[str, Any]) -> None:
    """bench/roofline.py in its own process (one engine, gone when it exits)."""
    import subprocess

    out = work / "roofline.json"
    engine = settings.engine_kwargs()
    cmd = [
        sys.executable,
        "-m",
        "bench.roofline",
        "--model",
        str(settings.model_dir),
        "--engine",
        json.dumps(engine),
        "--out",
        str(out),
        "--batch",
        str(settings.max_num_seqs),
    ]
    log = work / "roofline.log"
    with log.open("w") as fh:
        done = subprocess.run(
            cmd, cwd=ROOT, env={**os.environ, **settings.env()}, stdout=fh, stderr=fh, check=False
        )
    if done.returncode != 0:
        raise RuntimeError(f"bench.roofline exited {done.returncode}; see {log}")
    results["roofline"] = json.loads(out.read_text())


# ------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer requests and objects")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds of the serving sweep (default 5, --quick 2); intervals need >= 2",
    )
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
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds needs a positive integer")
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
MERGEABLE = ("autoscaling", "agents", "operator", "roofline")


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
        and args.rounds in (None, 5)
    )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = args.out_dir or (
        BENCH if full else Path(tempfile.gettempdir()) / f"moe-bench-{stamp}"
    )
    work = args.work_dir or Path(tempfile.gettempdir()) / f"moe-bench-work-{stamp}"
    work.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _interrupt)

    plan = Plan(args.quick, args.concurrency_list, args.prompt_tokens, args.max_tokens, args.rounds)
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
        "launches": [],
        "rounds": {},
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
                    "rounds": plan.rounds,
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
                elif section == "agents":
                    assert settings is not None and tok is not None
                    run_agents(settings, plan, work, results, tok)
                elif section == "roofline":
                    assert settings is not None
                    run_roofline(settings, work, results)
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
