"""Reference output for a checkpoint: Hugging Face transformers' greedy decoding.

Greedy decoding (temperature 0) of the same fp32 weights in transformers is an exact oracle for
what the vLLM engine must produce, token for token. Test-only (not shipped in moe_serving).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any


@functools.lru_cache(maxsize=4)
def _load(model_dir: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return tokenizer, model


def encode(model_dir: Path, prompt: str) -> list[int]:
    """Prompt token ids exactly as the served engine tokenizes a plain completion prompt."""
    tokenizer, _ = _load(str(model_dir))
    return list(tokenizer(prompt).input_ids)


def greedy_tokens(model_dir: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The `max_new_tokens` tokens transformers generates greedily after `prompt_ids`.

    Does not stop at EOS (the engine side is asked to ignore EOS too), so lengths always match.
    """
    import torch

    _, model = _load(str(model_dir))
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=model.generation_config.pad_token_id,
        )
    return [int(t) for t in out[0, len(prompt_ids) :]]
