"""run.py + report.py end to end with stand-in servers (stub_server.py; no engine may run here).

The stand-ins answer like an OpenAI server, so the orchestration (launch, warm-up, sweep,
facts, teardown), the ratio tables and the plots are exercised for real. The numbers are the
stand-ins' and are only checked for structure; they are written to a temporary folder.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import report
import run
from test_bench_systems import stub


class Words:
    def encode(self, text: str) -> list[int]:
        return [0] * len(text.split())


def small_plan() -> run.Plan:
    plan = run.Plan(quick=True)
    plan.requests = {1: 3, 4: 4, 16: 16}
    plan.warmup = 2
    plan.prompt_tokens = 8
    plan.max_tokens = 5
    return plan


def results_skeleton() -> dict[str, Any]:
    return {
        "meta": {
            "command": "bench/run.py --test",
            "machine": report.machine_facts(run.ROOT),
            "sections": ["serving"],
            "quick": True,
            "workload": {"prompt_tokens": 8, "max_tokens": 5},
        },
        "system_order": [],
        "systems": {},
        "serving": [],
        "operator": [],
        "sections": {"serving": {"status": "ok", "detail": "test"}},
    }


def test_serving_sweep_and_report_with_stand_ins(tmp_path: Path) -> None:
    plan = small_plan()
    results = results_skeleton()
    for name in ("vllm", "ours-http"):
        system = stub(("--child",))
        system.name = name

        def sweeps(running: Any, name: str = name) -> list[list[dict[str, Any]]]:
            return [asyncio.run(run.http_sweep(running, "tiny-moe", plan, Words(), name))]

        run.serve_system(system, tmp_path / "work", results, sweeps, [name])

    assert results["system_order"] == ["vllm", "ours-http"]
    cells = {(r["system"], r["stream"], r["concurrency"]) for r in results["serving"]}
    assert cells == {
        (s, st, c) for s in ("vllm", "ours-http") for st in (True, False) for c in (1, 4, 16)
    }
    for row in results["serving"]:
        s = row["summary"]
        assert s["ok"] == s["sent"] == plan.requests[row["concurrency"]]
        assert s["output_tokens_min"] == s["output_tokens_max"] == 5
    for name in ("vllm", "ours-http"):
        facts = results["systems"][name]
        assert facts["error"] is None
        assert facts["cold_start_s"] > 0 and facts["rss_peak_bytes"] > 0

    path = report.write(results, tmp_path / "out")
    text = path.read_text()
    assert "| ours (moectl up), HTTP |" in text  # a headline row with ratios
    assert text.count("x) |") >= 6  # ratio cells in the sweep tables
    vllm_row = next(line for line in text.splitlines() if line.startswith("| vLLM OpenAI server"))
    assert " s |" not in vllm_row.split("|")[3]  # req/s is a rate, not a duration
    assert ("bench/run.py --test" in text and "AMD" in text) or "Intel" in text or "cpu" in text
    for png in ("throughput.png", "latency_p99.png"):
        data = (tmp_path / "out" / png).read_bytes()
        assert data.startswith(b"\x89PNG")
    assert (tmp_path / "out" / "results.json").is_file()


def test_a_failing_system_is_recorded_and_reraised(tmp_path: Path) -> None:
    results = results_skeleton()
    system = stub(("--die",))
    system.name = "ray-serve-llm"
    with pytest.raises(Exception, match="exited with code 3"):
        run.serve_system(system, tmp_path, results, lambda running: [[]], ["ray-serve-llm"])
    assert "exited with code 3" in results["systems"]["ray-serve-llm"]["error"]
    text = report.render(results, [])
    assert "(failed: LaunchError" in text


def test_sections_and_partial_runs() -> None:
    args = run.parse_args(["--only", "operator,serving", "--quick"])
    assert args.sections == ["serving", "operator"]  # always in the documented order
    with pytest.raises(SystemExit):
        run.parse_args(["--only", "gpu"])
    assert run.parse_args([]).sections == list(run.SECTIONS)
