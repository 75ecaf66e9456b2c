"""`moe_serving.hops`: off without `MOE_HOP_LOG`; with it, one line per hop in `<prefix>.<pid>`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
from moe_serving import hops
print(hops.ENABLED)
if hops.ENABLED:
    hops.mark("ingress.in")
    hops.mark("vllm.first_token", 3, at_ns=123)
"""


def _run(env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def test_off_without_the_variable() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MOE_HOP_LOG"}
    assert _run(env) == "False"


def test_marks_go_to_a_file_per_process(tmp_path: Path) -> None:
    prefix = tmp_path / "hop"
    assert _run({**os.environ, "MOE_HOP_LOG": str(prefix)}) == "True"
    (log,) = tmp_path.iterdir()
    assert log.name.startswith("hop.")
    first, second = log.read_text().splitlines()
    at, hop, n = first.split()
    assert hop == "ingress.in" and n == "0" and int(at) > 0
    assert second == "123 vllm.first_token 3"
