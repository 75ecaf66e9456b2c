"""`moectl` on the command line: real subprocesses, exit codes and messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from unit_support import ROOT

GEMMA = ROOT / "manifests/examples/gemma4-26b-a4b-a100-80gb.yaml"


def moectl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moe_operator.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_plan_table_and_json() -> None:
    table = moectl("plan", "-f", str(GEMMA))
    assert table.returncode == 0, table.stderr
    assert "EP2 (64 experts/rank) TP2 DP1 PP1 = 2 GPUs on 1 node" in table.stdout
    assert "0-63" in table.stdout and "64-127" in table.stdout
    out = moectl("plan", "-f", str(GEMMA), "-o", "json")
    data = json.loads(out.stdout)
    assert data["expert_parallel_size"] == 2 and len(data["placement"]) == 2


def test_render_prints_schema_objects() -> None:
    out = moectl("render", "-f", str(GEMMA))
    assert out.returncode == 0, out.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(out.stdout)]
    assert kinds == ["RayService", "Service", "Service", "PodDisruptionBudget"]


def test_crd_command_prints_the_generated_crd() -> None:
    out = moectl("crd")
    assert out.returncode == 0
    assert out.stdout == (ROOT / "manifests/crd.yaml").read_text()


def test_bad_yaml_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed\n")
    out = moectl("plan", "-f", str(bad))
    assert out.returncode == 2
    assert "is not valid YAML" in out.stderr and "Traceback" not in out.stderr


def test_invalid_spec_names_fields() -> None:
    doc = yaml.safe_load(GEMMA.read_text())
    doc["spec"]["parallelism"]["tensorParallelSize"] = 0
    doc["spec"]["resources"]["gpuPerNode"] = 8
    out = moectl("validate", "-f", "-", stdin=yaml.safe_dump(doc))
    assert out.returncode == 2
    assert "spec.parallelism.tensorParallelSize: must be a positive integer or 'auto'" in out.stderr
    assert "spec.resources.gpuPerNode: unknown field" in out.stderr
    assert "Traceback" not in out.stderr


def test_unplannable_spec_says_what_to_change() -> None:
    doc = yaml.safe_load(GEMMA.read_text())
    doc["spec"]["model"]["maxModelLen"] = 500_000
    out = moectl("plan", "-f", "-", stdin=yaml.safe_dump(doc))
    assert out.returncode == 2
    assert "context limit of 262144 tokens; lower it" in out.stderr


def test_missing_file() -> None:
    out = moectl("plan", "-f", "/nonexistent.yaml")
    assert out.returncode == 2 and "cannot read /nonexistent.yaml" in out.stderr


def test_catalog_lists_gemma_with_its_routing() -> None:
    out = moectl("catalog")
    assert "gemma-4-26b-a4b" in out.stdout and "top-8 of 128" in out.stdout
