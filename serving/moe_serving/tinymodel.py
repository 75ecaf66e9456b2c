"""Tiny random-weight MoE checkpoints, made locally, for tests and local runs without a model hub.

`make_model` writes a complete Hugging Face checkpoint (config, fp32 safetensors, a byte-level BPE
tokenizer trained here with a chat template) that vLLM and transformers both load. Everything is
derived from the seed, so the same seed gives byte-identical weights; greedy decoding of the
checkpoint in transformers is then an exact oracle for what the served engine must answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

Arch = Literal["gemma4", "qwen3_moe", "mixtral"]
ARCHS: tuple[Arch, ...] = ("gemma4", "qwen3_moe", "mixtral")

# Bumped whenever the recipe changes, so an old checkpoint in `out` is rebuilt, not reused.
RECIPE_VERSION = 2
_STAMP = "moe_tinymodel.json"

VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0..3 in this order
# Control tokens a family's vLLM parsers look up in the vocabulary (next ids, after the above):
# vLLM's `mistral` tool parser refuses a tokenizer without `[TOOL_CALLS]`, which Mixtral
# 8x22B Instruct's tokenizer has (its pre-v11 call format: `[TOOL_CALLS] [{"name": ...}]`).
FAMILY_TOKENS: dict[str, list[str]] = {"mixtral": ["[TOOL_CALLS]"]}
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
# The control tokens each catalog family's released tokenizer has that its vLLM tool-call and
# reasoning parsers look up (the parsers' sources name them): for tokenizers made with
# `make_tokenizer` in parser tests, with and without them.
PARSER_TOKENS: dict[str, list[str]] = {
    # google/gemma-4-*-it: tool calls <|tool_call>...<tool_call|>, thinking <|channel>...
    "gemma4": ["<|tool_call>", "<tool_call|>", "<|tool_response>", "<|channel>", "<channel|>"],
    # mistralai/Mixtral-8x22B-Instruct-v0.1 (8x7B Instruct v0.1 has none of them).
    "mixtral": ["[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]"],
    # Qwen/Qwen3-*: hermes-style <tool_call> JSON, <think> reasoning.
    "qwen3_moe": ["<tool_call>", "</tool_call>", "<think>", "</think>"],
    # deepseek-ai/DeepSeek-V3 tokenizer.json (fullwidth bars and "▁" in its control tokens).
    "deepseek_v3": [
        "<\uff5ctool\u2581calls\u2581begin\uff5c>",
        "<\uff5ctool\u2581calls\u2581end\uff5c>",
        "<\uff5ctool\u2581call\u2581begin\uff5c>",
        "<\uff5ctool\u2581call\u2581end\uff5c>",
        "<\uff5ctool\u2581sep\uff5c>",
        "<think>",
        "</think>",
    ],
}

# A plain role-tagged template: works for every architecture and for vLLM's chat endpoint.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_WORD_TEXT = (
    "the a an expert router token layer model serve request queue replica engine rank gate "
    "weight tensor parallel mixture sparse dense cluster node pod service operator deploy scale "
    "batch stream prompt answer question hello world cat dog tree river mountain blue green red "
    "fast slow small large one two three four five six seven eight nine ten and or but if then "
    "when while because is are was were be have has do does can will would should may might "
    "time data code test run build ship read write learn think compute route balance load"
)


def _corpus(seed: int, n_lines: int = 4000) -> list[str]:
    """Deterministic pseudo-English text: the tokenizer's training data (no files, no network)."""
    rng = random.Random(seed)
    words_pool = _WORD_TEXT.split()
    punct = [".", ",", "!", "?", ":", ";"]
    lines: list[str] = []
    for i in range(n_lines):
        words = [rng.choice(words_pool) for _ in range(rng.randint(4, 16))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 9999)))
        line = " ".join(words) + rng.choice(punct)
        lines.append(line.capitalize() if i % 3 == 0 else line)
    # Printable ASCII once, so every byte sequence of plain text has merges to learn from.
    lines.append("".join(chr(c) for c in range(32, 127)))
    return lines


def _train_tokenizer(seed: int, out: Path, arch: Arch) -> None:
    make_tokenizer(out, FAMILY_TOKENS.get(arch, []), seed=seed)


def make_tokenizer(out: Path, extra_special_tokens: list[str], seed: int = 0) -> Path:
    """Write a tiny byte-level BPE tokenizer (with the chat template) into `out`, with
    `extra_special_tokens` after the standard four; returns `out`. Offline, about a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS + list(extra_special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        model_max_length=2048,
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(str(out))
    return out


def _config(arch: Arch, vocab_size: int) -> Any:
    from transformers import AutoConfig

    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,  # divisible by TP=2
        "head_dim": 64,  # CPU attention rejects small head sizes (16 fails)
        "max_position_embeddings": 2048,
        "pad_token_id": PAD_ID,
        "eos_token_id": EOS_ID,
        "bos_token_id": BOS_ID,
        "dtype": "float32",
    }
    if arch == "gemma4":
        return AutoConfig.for_model(
            "gemma4_text",
            **common,
            intermediate_size=128,
            enable_moe_block=True,
            num_experts=8,
            top_k_experts=2,
            moe_intermediate_size=64,
            # No per-layer input embeddings (PLE): keeps the table tiny and the model a plain MoE.
            hidden_size_per_layer_input=0,
            vocab_size_per_layer_input=vocab_size,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=128,
            global_head_dim=64,
            # Untied: with a tied, sqrt(hidden)-scaled embedding a random model just echoes the
            # last input token, which would make the oracle comparison nearly vacuous.
            tie_word_embeddings=False,
        )
    if arch == "qwen3_moe":
        return AutoConfig.for_model(
            "qwen3_moe",
            **common,
            intermediate_size=128,
            moe_intermediate_size=64,
            num_experts=16,
            num_experts_per_tok=4,
            decoder_sparse_step=1,
            norm_topk_prob=True,
            tie_word_embeddings=False,
        )
    return AutoConfig.for_model(
        "mixtral",
        **common,
        intermediate_size=128,
        num_local_experts=8,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    )


def _stamp(arch: Arch, seed: int) -> dict[str, Any]:
    return {"arch": arch, "seed": seed, "recipe": RECIPE_VERSION}


def _is_complete(out: Path, arch: Arch, seed: int) -> bool:
    stamp = out / _STAMP
    if not stamp.is_file():
        return False
    try:
        saved = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    return saved == _stamp(arch, seed) and all(
        (out / name).is_file()
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    )


def make_model(arch: Arch, out: Path, seed: int = 0) -> Path:
    """Write a tiny random-weight MoE checkpoint of `arch` into `out` and return `out`.

    Deterministic: the same `(arch, seed)` gives identical weights and tokenizer. A complete
    checkpoint already in `out` made by the same recipe is reused. Runs offline.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    out = Path(out)
    if _is_complete(out, arch, seed):
        return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp dir, then swap in: an interrupted run never leaves a half checkpoint.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _train_tokenizer(seed, tmp, arch)
        config = _config(arch, VOCAB_SIZE)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _randomize(model, seed)
        model.generation_config = GenerationConfig(
            bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID
        )
        model.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / _STAMP).write_text(json.dumps(_stamp(arch, seed)))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _randomize(model: Any, seed: int) -> None:
    """Fill every tensor from a seeded generator, independent of module init order.

    Each tensor gets its own generator seeded from (seed, name), so weights do not depend on how
    transformers happens to initialise modules. Norm scales stay near 1 and routers get a larger
    spread so that the routing (the thing under test) is decisive, not a coin flip on near-ties.
    """
    import torch

    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32)
            if tensor.dim() <= 1:
                # Norm weights, router/expert scales, layer scalars: all multiplicative, around 1.
                value = 1.0 + 0.1 * noise
            elif name.endswith("router.proj.weight"):
                # Gemma-4 scales the router input by hidden**-0.5 itself: std 2 gives logits ~2.
                value = 2.0 * noise
            elif name.endswith(".gate.weight"):
                value = 2.0 * noise / tensor.shape[-1] ** 0.5
            else:
                value = noise / tensor.shape[-1] ** 0.5
            tensor.data.copy_(value.to(tensor.dtype))
