"""Runs vLLM's offline engine once and prints greedy token ids as JSON (a test helper script).

vLLM spawns worker processes, so the engine must start from a script's `__main__`; the oracle
tests run this file in a subprocess:
    python vllm_greedy.py MODEL_DIR --tp 2 --ep --max-tokens 16 --prompt-ids '[[2, 5, 9]]'
"""

from __future__ import annotations

import argparse
import json
import os


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--ep", action="store_true", help="enable_expert_parallel")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prompt-ids", required=True, help="JSON list of token-id lists")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.tp == 2:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=args.model,
        tensor_parallel_size=args.tp,
        enable_expert_parallel=args.ep,
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in json.loads(args.prompt_ids)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    result = [list(out.outputs[0].token_ids) for out in outputs]
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
