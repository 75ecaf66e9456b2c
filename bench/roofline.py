"""The planner's decode roofline checked against this machine (the `roofline` section).

`moectl plan` predicts a replica's decode tokens/s from memory bandwidth
(operator/moe_operator/throughput.py). On the CPU the same formula can be checked: this module
measures the machine's memory bandwidth with a small probe (numpy copies of an array larger
than the caches: bytes read + written per second, best of several), predicts the tiny model's
decode rate with that bandwidth, the plan's layout and the measured workload's batch and
context, and measures the real decode rate with vLLM offline (same engine settings as the
serving sweep): a batch of B prompts generating 1 token, then N tokens; decode tokens/s =
B x (N - 1) / (time(N) - time(1)), best of `repeats`.

Run by `bench.run` in a subprocess (one engine, then gone):
    .venv/bin/python -m bench.roofline --model DIR --out result.json [--batch 32 --tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

#: Probe array size: well beyond the last-level cache.
PROBE_BYTES = 256 * 2**20


def memory_bandwidth_gbs(repeats: int = 5) -> float:
    """Best copy bandwidth (read + write bytes per second) in GB/s, one thread."""
    import numpy as np

    src = np.ones(PROBE_BYTES // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * PROBE_BYTES / best / 1e9


def predict(
    model_dir: Path, engine: dict[str, Any], bandwidth_gbs: float, batch: int, context: int
) -> dict[str, Any]:
    """The roofline's decode tokens/s for this checkpoint and layout at `bandwidth_gbs`."""
    from moe_operator.catalog import Accelerator, from_hf_config
    from moe_operator.throughput import decode_roofline

    config = json.loads((model_dir / "config.json").read_text())
    arch = from_hf_config(config)
    tp = int(engine.get("tensor_parallel_size", 1))
    ep = tp if engine.get("enable_expert_parallel") else 1
    bytes_per_param = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0}[engine["dtype"]]
    shard = min(tp, arch.num_kv_heads) if arch.num_kv_heads > 1 else 1
    kv = arch.kv_elements_per_token() * bytes_per_param / shard
    window = arch.kv_elements_sliding_per_sequence() * bytes_per_param / shard
    cpu = Accelerator("CPU", 8, bandwidth_gbs, 0.0, k8s_resource="", node_label="")
    out = {}
    for efficiency in (0.5, 1.0):
        est = decode_roofline(
            arch,
            cpu,
            tp=tp,
            dp=1,
            ep=ep,
            pp=1,
            experts_per_rank=arch.num_experts // ep if ep > 1 else arch.num_experts,
            bytes_per_param=bytes_per_param,
            kv_bytes_per_token_per_gpu=kv,
            kv_window_bytes_per_sequence_per_gpu=window,
            batch=batch,
            context_tokens=context,
            efficiency=efficiency,
        )
        out[f"{efficiency:g}"] = est.output_tokens_per_s
    return {"tokens_per_s_by_efficiency": out, "bytes_per_param": bytes_per_param, "tp": tp}


def measure(
    model_dir: Path, engine: dict[str, Any], batch: int, tokens: int, prompt: int, repeats: int
) -> dict[str, Any]:
    """Decode tokens/s of vLLM offline for a batch (see the module docstring)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), **engine)
    prompts = [
        {"prompt_token_ids": [(7 * i + 3 * j) % 200 + 10 for j in range(prompt)]}
        for i in range(batch)
    ]

    def timed(n: int) -> float:
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        assert all(len(o.outputs[0].token_ids) == n for o in outs)
        return elapsed

    timed(tokens)  # warm-up
    one = min(timed(1) for _ in range(repeats))
    many = min(timed(tokens) for _ in range(repeats))
    return {
        "prefill_s": one,
        "total_s": many,
        "decode_tokens_per_s": batch * (tokens - 1) / (many - one) if many > one else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="check the decode roofline on this CPU")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--engine", type=str, required=True, help="vLLM engine kwargs (JSON)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    engine = json.loads(args.engine)
    bandwidth = memory_bandwidth_gbs()
    context = args.prompt + args.tokens // 2
    predicted = predict(args.model, engine, bandwidth, args.batch, context)
    measured = measure(args.model, engine, args.batch, args.tokens, args.prompt, args.repeats)
    rate = measured["decode_tokens_per_s"]
    result = {
        "bandwidth_gbs": bandwidth,
        "batch": args.batch,
        "tokens": args.tokens,
        "prompt_tokens": args.prompt,
        "context_tokens": context,
        "engine": engine,
        "omp_threads": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
        "predicted": predicted,
        "measured": measured,
        "ratio_measured_to_predicted": {
            eff: (rate / p if rate and p else None)
            for eff, p in predicted["tokens_per_s_by_efficiency"].items()
        },
    }
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
