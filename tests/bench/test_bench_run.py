"""run.py + report.py end to end with stand-in servers (stub_server.py; no engine may run here).

The stand-ins answer like an OpenAI server, so the orchestration (rounds, rotation, launches
shared across a round boundary, warm-up, cells, CPU accounting, failures, teardown), the ratio
tables with their intervals and the plots are exercised for real. Where a stand-in is made
slower, CPU-hungrier or failing on purpose, the report must say so; elsewhere the stand-ins'
numbers are only checked for structure. Everything is written to a temporary folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from stub_system import stub

from bench import report, run, stats

MODEL = "tiny-moe"
KEY_OF = {
    "vllm": "vllm",
    "ray-serve-llm": "ray-serve-llm",
    "ours-http": "ours",
    "ours-grpc": "ours",
}


class Words:
    def encode(self, text: str) -> list[int]:
        return [0] * len(text.split())


def small_plan(rounds: int, requests: dict[int, int] | None = None) -> run.Plan:
    plan = run.Plan(quick=True, concurrency=[1, 4], rounds=rounds)
    plan.requests = requests or {1: 3, 4: 8}
    plan.warmup = 2
    plan.prompt_tokens = 8
    plan.max_tokens = 5
    return plan


def results_skeleton(rounds: int = 1) -> dict[str, Any]:
    return {
        "meta": {
            "command": "bench/run.py --test",
            "machine": report.machine_facts(run.ROOT),
            "sections": ["serving"],
            "quick": True,
            "workload": {"prompt_tokens": 8, "max_tokens": 5, "rounds": rounds},
        },
        "system_order": [],
        "systems": {},
        "launches": [],
        "rounds": {},
        "serving": [],
        "operator": [],
        "sections": {"serving": {"status": "ok", "detail": "test"}},
    }


def stand_in_steps(flags: dict[str, tuple[str, ...]] | None = None) -> dict[str, run.Step]:
    """vLLM, Ray Serve LLM and ours (two targets, both HTTP here) as stand-in servers."""
    flags = flags or {}
    http = run.http_opener(MODEL, Words())
    steps = {}
    for key, targets in (
        ("vllm", ["vllm"]),
        ("ray-serve-llm", ["ray-serve-llm"]),
        ("ours", ["ours-http", "ours-grpc"]),
    ):
        system = stub(("--child", *flags.get(key, ())))
        system.name = key
        steps[key] = run.Step(system, {name: http for name in targets})
    return steps


def serve(
    tmp_path: Path, plan: run.Plan, steps: dict[str, run.Step]
) -> tuple[dict[str, Any], list[str], list[list[str]]]:
    results = results_skeleton(plan.rounds)
    orders = stats.round_orders(list(steps), plan.rounds)
    failures = run.run_rounds(steps, orders, plan, tmp_path / "work", results, "serving")
    return results, failures, orders


def test_rounds_rotate_interleave_and_share_launches(tmp_path: Path) -> None:
    plan = small_plan(rounds=3)
    results, failures, orders = serve(tmp_path, plan, stand_in_steps())
    assert failures == []
    rows = results["serving"]

    # Visits happen round by round in the rotated orders (rows are appended as measured).
    visits: list[tuple[int, str]] = []
    for row in rows:
        visit = (row["round"], KEY_OF[row["system"]])
        if not visits or visits[-1] != visit:
            visits.append(visit)
    assert visits == [(r, key) for r, order in enumerate(orders) for key in order]

    # Every (target, stream, concurrency, round) cell exactly once.
    cells = [(r["system"], r["stream"], r["concurrency"], r["round"]) for r in rows]
    assert sorted(cells) == sorted(
        (s, st, c, rnd) for s in KEY_OF for st in (True, False) for c in (1, 4) for rnd in range(3)
    )

    # A system ending a round and starting the next stayed up: 7 launches for 9 visits.
    groups = stats.launch_groups(orders)
    assert len(groups) == 7
    launches = results["launches"]
    assert [(la["system"], tuple(la["rounds"])) for la in launches] == [
        (g.system, g.rounds) for g in groups
    ]
    for la in launches:
        assert la["error"] is None and la["rounds_done"] == la["rounds"]
        assert la["cold_start_s"] > 0 and la["rss_peak_bytes"] > 0
        assert Path(la["log"]).parent.name == f"launch-{la['launch']:02d}-{la['system']}"
        for r in la["rounds"]:
            assert {
                row["launch"]
                for row in rows
                if row["round"] == r and KEY_OF[row["system"]] == la["system"]
            } == {la["launch"]}
    assert results["rounds"]["serving"]["orders"] == orders

    # Cells start at a different one each round; ours' two targets alternate which goes first.
    all_cells = plan.cells((True, False))
    for r in range(3):
        mine = [row for row in rows if row["round"] == r and row["system"] == "vllm"]
        assert [(row["stream"], row["concurrency"]) for row in mine] == stats.rotate(all_cells, r)
        ours = [row for row in rows if row["round"] == r and KEY_OF[row["system"]] == "ours"]
        firsts = [ours[i]["system"] for i in range(0, len(ours), 2)]
        assert firsts == [
            stats.rotate(["ours-http", "ours-grpc"], r + i)[0] for i in range(len(all_cells))
        ]

    for row in rows:
        s = row["summary"]
        assert s["ok"] == s["sent"] == plan.requests[row["concurrency"]]
        assert row["failures"] == []
        assert row["output_tokens"] == 5 * s["ok"]
        assert row["cpu_s"] >= 0 and row["cpu_s_per_1k_tokens"] is not None

    path = report.write(results, tmp_path / "out")
    text = path.read_text()
    assert "Valid: no request and no launch of a baseline system" in text
    assert "| ours HTTP / vLLM | 1 |" in text  # a ratio row with intervals
    assert "| ours gRPC / ours HTTP |" in text
    assert "round 1: ours -> vllm -> ray-serve-llm" in text
    assert "Only 3 round(s)" in text
    cold = text.split("## Cold start and memory")[1].split("\n## ")[0]
    ours_row = next(line for line in cold.splitlines() if line.startswith("| ours |"))
    assert ours_row.split("|")[2].strip() == "2"  # launches of ours for 3 rounds
    assert "x [" in ours_row.split("|")[4]  # cold start vs vLLM's, with an interval
    for png in ("throughput.png", "latency_p99.png"):
        assert (tmp_path / "out" / png).read_bytes().startswith(b"\x89PNG")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(saved["serving"]) == len(rows)


def test_a_slower_cpu_hungrier_system_is_behind_with_intervals(tmp_path: Path) -> None:
    """ours burns 6x the CPU per request and sleeps 10 ms per token: both show, beyond noise."""
    plan = small_plan(rounds=3, requests={1: 4, 4: 8})
    steps = stand_in_steps(
        {
            "vllm": ("--burn", "0.005"),
            "ray-serve-llm": ("--burn", "0.005"),
            "ours": ("--burn", "0.03", "--token-delay", "0.01"),
        }
    )
    results, failures, _ = serve(tmp_path, plan, steps)
    assert failures == []
    iv = report.interval(results, "ours-http", "vllm", True, 4, "cpu_s_per_1k_tokens")
    assert iv is not None and iv.n == 3
    assert iv.estimate > 1.8 and iv.worse(higher_is_better=False)
    e2e = report.interval(results, "ours-grpc", "vllm", False, 1, "e2e_p50_s")
    assert e2e is not None and e2e.worse(higher_is_better=False)

    text = report.render(results, [])
    section = text.split("## Where ours is behind a peer")[1].split("\n## ")[0]
    behind_rows = [
        line for line in section.splitlines() if line.startswith("| ") and "---" not in line
    ][1:]
    assert any("ours HTTP / vLLM | CPU s / 1k tok" in line for line in behind_rows)
    assert any("ours gRPC / Ray Serve LLM | E2E p50" in line for line in behind_rows)
    assert all(line.endswith("|  |") for line in behind_rows)  # the reason is left for a human
    # The peers among themselves are never "behind" (only ours is judged against them).
    assert not any(line.split("|")[2].strip().startswith("Ray Serve LLM /") for line in behind_rows)


def test_failed_baseline_requests_make_the_run_invalid(tmp_path: Path) -> None:
    plan = small_plan(rounds=2)
    steps = stand_in_steps({"vllm": ("--fail-every", "4")})
    results, failures, _ = serve(tmp_path, plan, steps)
    assert failures == []  # failed requests are data, not a failed section
    vllm_failures = [
        f for row in results["serving"] if row["system"] == "vllm" for f in row["failures"]
    ]
    assert vllm_failures and all("HTTP 500" in f["error"] for f in vllm_failures)
    assert all("injected failure" in f["error"] for f in vllm_failures)
    # Every failed request is kept, not only distinct errors.
    failed = sum(row["summary"]["failed"] for row in results["serving"] if row["system"] == "vllm")
    assert len(vllm_failures) == failed

    text = report.render(results, [])
    assert "INVALID RUN: unexplained baseline failures" in text
    validity = text.split("## Validity")[1].split("\n## ")[0]
    assert "vLLM OpenAI server (baseline), " in validity and "injected failure" in validity
    assert "| vLLM OpenAI server (baseline) | " in text.split("## Failed requests")[1]


def test_failures_of_ours_are_listed_but_do_not_invalidate(tmp_path: Path) -> None:
    plan = small_plan(rounds=1)
    steps = stand_in_steps({"ours": ("--fail-every", "3")})
    results, failures, _ = serve(tmp_path, plan, steps)
    assert failures == []
    text = report.render(results, [])
    assert "INVALID RUN" not in text
    listed = text.split("## Failed requests")[1].split("\n## ")[0]
    assert "| ours (moectl up), HTTP |" in listed and "injected failure" in listed
    # One round: no intervals, so nothing can be called behind.
    assert "No intervals: fewer than 2 rounds" in text
    assert "(1 round)" in text


def test_a_baseline_that_does_not_start_is_recorded_and_the_rest_still_runs(
    tmp_path: Path,
) -> None:
    plan = small_plan(rounds=2)
    steps = stand_in_steps({"ray-serve-llm": ("--die",)})
    results, failures, _ = serve(tmp_path, plan, steps)
    assert len(failures) == 2 and all("exited with code 3" in f for f in failures)
    dead = [la for la in results["launches"] if la["system"] == "ray-serve-llm"]
    assert len(dead) == 2 and all("exited with code 3" in la["error"] for la in dead)
    assert {row["system"] for row in results["serving"]} == {"vllm", "ours-http", "ours-grpc"}
    text = report.render(results, [])
    assert "INVALID RUN: unexplained baseline failures" in text
    assert "Ray Serve LLM build_openai_app, launch" in text
    assert "(2 failed)" in text


# -------------------------------------------------------------- rendering with known answers


def synthetic(rounds: int) -> dict[str, Any]:
    """Per-round cells with drift shared by all systems: ours HTTP at exactly 0.8x vLLM's
    throughput and 1.25x its latency and CPU; ours gRPC equal to vLLM within +-3% noise."""
    results = results_skeleton(rounds)
    results["system_order"] = ["vllm", "ours-http", "ours-grpc"]
    noise = [1.03, 0.97, 1.02, 0.98, 1.01]
    for r in range(rounds):
        drift = 1 + 0.4 * r
        for stream in (True, False):
            for conc in (1, 4):
                base = {"tok": 100 / drift, "lat": 0.5 * drift, "cpu": 2.0 * drift}
                for system, f in (
                    ("vllm", (1, 1)),
                    ("ours-http", (0.8, 1.25)),
                    ("ours-grpc", (noise[r], noise[(r + 1) % 5])),
                ):
                    summary = {
                        "ok": 10,
                        "sent": 10,
                        "failed": 0,
                        "requests_per_s": base["tok"] * f[0] / 32,
                        "output_tokens_per_s": base["tok"] * f[0],
                        "ttft_p50_s": base["lat"] * f[1] / 5 if stream else None,
                        "ttft_p99_s": base["lat"] * f[1] / 4 if stream else None,
                        "e2e_p50_s": base["lat"] * f[1],
                        "e2e_p99_s": base["lat"] * f[1] * 1.5,
                    }
                    results["serving"].append(
                        {
                            "system": system,
                            "stream": stream,
                            "concurrency": conc,
                            "round": r,
                            "summary": summary,
                            "cpu_s_per_1k_tokens": base["cpu"] * f[1],
                            "failures": [],
                        }
                    )
    return results


def test_report_of_known_ratios() -> None:
    results = synthetic(5)
    results["serving"][0]["summary"]["cancelled"] = 2  # a vLLM cell hit its wall-time bound
    text = report.render(results, [])
    assert "Valid:" in text and "Only" not in text.split("## Run")[0]
    assert "- note: 2 request(s) of vLLM OpenAI server (baseline) were still running" in text
    behind = text.split("## Where ours is behind a peer")[1].split("\n## ")[0]
    assert (
        "| streaming, concurrency 1 | ours HTTP / vLLM | out tok/s | 0.80x [0.80, 0.80] |  |"
        in behind
    )
    assert (
        "| non-streaming, concurrency 4 | ours HTTP / vLLM | CPU s / 1k tok | "
        "1.25x [1.25, 1.25] |  |" in behind
    )
    assert "TTFT p50 | 1.25x" in behind
    assert "ours gRPC" not in behind  # within noise: its intervals include 1.0
    # ours HTTP: 4 cells x 5 metrics (TTFT only in the 2 streaming cells) = 18 behind rows.
    assert (
        len([line for line in behind.splitlines() if line.startswith("| ") and "---" not in line])
        == 1 + 18
    )

    head = text.split("## Headline")[1].split("\n## ")[0]
    http_row = next(line for line in head.splitlines() if line.startswith("| ours HTTP / vLLM"))
    assert "0.80x (4 worse, 0 better, of 4)" in http_row
    assert "1.25x (2 worse, 0 better, of 2)" in http_row  # TTFT: streaming cells only
    grpc_row = next(line for line in head.splitlines() if line.startswith("| ours gRPC / vLLM"))
    assert "0 worse, 0 better" in grpc_row

    ttft = text.split("## TTFT p50 at concurrency 1")[1].split("\n## ")[0]
    assert "| ours HTTP / vLLM | 1.25x [1.25, 1.25] |" in ttft
    grpc = text.split("## gRPC / HTTP")[1].split("\n## ")[0]
    assert "| yes | 1 |" in grpc and "| no | 4 |" in grpc
    values = text.split("## Serving, streaming: values")[1].split("\n## ")[0]
    assert "| vLLM OpenAI server (baseline) | 1 |" in values and "| 50/50 | 5 |" in values


def test_a_round_where_a_side_served_nothing_is_left_out_and_said_so() -> None:
    results = synthetic(5)
    for row in results["serving"]:
        if (row["system"], row["stream"], row["concurrency"], row["round"]) == (
            "ours-http",
            True,
            4,
            2,
        ):
            row["summary"]["output_tokens_per_s"] = 0.0
    iv = report.interval(results, "ours-http", "vllm", True, 4, "output_tokens_per_s")
    assert iv is not None and iv.n == 4
    table = report.render(results, []).split("## Serving, streaming: ratios")[1]
    assert "| ours HTTP / vLLM | 4 | 0.80x [0.80, 0.80] (4 of 5 rounds) |" in table


def test_a_report_from_one_round_calls_nothing_behind() -> None:
    text = report.render(synthetic(1), [])
    assert "No intervals: fewer than 2 rounds" in text
    assert "0.80x (1 round)" in text


def test_the_recorded_run_renders_as_recorded() -> None:
    """bench/results.json (the full run of 2026-12-05 16:20, 5 rounds, every section) renders as
    RESULTS.md does: valid (no baseline failure), targets judged, the agents section with the
    router's decisions."""
    results = json.loads((run.BENCH / "results.json").read_text())
    text = report.render(results, [])
    assert "INVALID RUN" not in text and "Valid: no request" in text
    assert "## Targets" in text and "| cold start <= 1.1x vLLM |" in text
    assert "| agent | TTFT p50 |" in text and "router decisions, agent workload" in text


def test_sections_and_partial_runs() -> None:
    args = run.parse_args(["--only", "operator,serving", "--quick"])
    assert args.sections == ["serving", "operator"]  # always in the documented order
    with pytest.raises(SystemExit):
        run.parse_args(["--only", "gpu"])
    assert run.parse_args([]).sections == list(run.SECTIONS)
    assert run.parse_args(["--rounds", "7"]).rounds == 7
    with pytest.raises(SystemExit):
        run.parse_args(["--rounds", "0"])
    full, quick = run.Plan(quick=False), run.Plan(quick=True)
    assert full.rounds == 5 and quick.rounds == 2
    assert full.requests[16] >= 60 and full.max_seconds >= 30
    assert full.requests[1] < full.requests[4] < full.requests[16]
    assert quick.requests[16] < full.requests[16]
    # The estimate counts 11 launches for 5 rounds of 3 systems (one shared per boundary).
    targets = {"vllm": 1, "ray-serve-llm": 1, "ours": 2}
    assert full.estimate_serving_s(targets) > quick.estimate_serving_s(targets)


def test_main_refuses_engines_beside_another_ray_and_still_writes_a_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--only serving --quick` end to end through main(), with a (pretend) foreign Ray."""
    monkeypatch.setattr(run, "foreign_engines", lambda: ["4242: /fake/raylet"])
    code = run.main(
        [
            "--only",
            "serving",
            "--quick",
            "--rounds",
            "3",
            "--out-dir",
            str(tmp_path / "out"),
            "--work-dir",
            str(tmp_path / "work"),
        ]
    )
    assert code == 1
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["sections"]["serving"]["status"] == "not run"
    assert saved["launches"] == [] and saved["serving"] == []
    text = (tmp_path / "out" / "RESULTS.md").read_text()
    assert "/fake/raylet" in text and "INVALID" not in text


def test_targets_are_judged_only_where_the_interval_is_on_one_side() -> None:
    text = report.render(synthetic(5), [])
    targets = text.split("## Targets")[1].split("\n## ")[0]
    # ours HTTP is exactly 0.80x vLLM's throughput: below 0.97 with the whole interval.
    assert (
        "| out tok/s >= 0.97x vLLM | ours HTTP / vLLM | streaming c=1 | 0.80x [0.80, 0.80] | "
        "**missed** |" in targets
    )
    # An interval across the bound gives no verdict, only the estimate's side.
    spans = stats.Interval(0.99, 0.90, 1.08, 5)
    assert report._verdict(spans, 0.97, True) == "likely met (interval spans the bound)"
    assert report._verdict(spans, 1.0, True).startswith("**likely missed**")
    assert report._verdict(stats.Interval(1.2, 1.1, 1.3, 5), 1.15, False).startswith("**likely")
    assert report._verdict(stats.Interval(1.3, 1.2, 1.4, 5), 1.15, False) == "**missed**"
    # gRPC vs HTTP latency: gRPC is 1.25x faster, exactly -> met in every cell.
    assert "| gRPC E2E p50 <= HTTP | ours gRPC / ours HTTP | non-streaming c=4 | 0.80x" in targets
    assert "Of " in targets and " met" in targets and "missed" in targets
