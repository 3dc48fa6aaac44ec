"""Tiny random HF checkpoints for numerics tests (built with transformers, nothing downloaded).

Every parameter is perturbed after transformers' init, because HF initialises biases to 0 and norms to 1:
without this a missing bias or q/k norm would go unnoticed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=256,
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small enough that the tiny model's frequencies fall in all three llama3 bands.
    "original_max_position_embeddings": 64,
    "rope_theta": 500000.0,
}

# name -> (config class, model class, extra config kwargs)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama3_rope_tied": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": LLAMA3_ROPE, "tie_word_embeddings": True}),
    "qwen2_bias_tied": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3_qknorm": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
    "mistral_window": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 6}),
    "qwen3_yarn": ("Qwen3Config", "Qwen3ForCausalLM", {"rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}}),
}


def make_hf_model(family: str, seed: int = 0, **overrides):
    """A random transformers model of the family, eager attention, fp32, eval mode."""
    import transformers

    cfg_name, model_name, extra = FAMILIES[family]
    torch.manual_seed(seed)
    kwargs = {**BASE, **extra, **overrides}
    config = getattr(transformers, cfg_name)(**kwargs)
    config._attn_implementation = "eager"
    model = getattr(transformers, model_name)(config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.1 if ("norm" in name or "bias" in name) else 0.02
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def save_hf_checkpoint(family: str, out: Path, seed: int = 0, max_shard_size: str | None = None, **overrides):
    model = make_hf_model(family, seed, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return model


def checkpoint_factory(tmp_path_factory: Any) -> Callable[[str], tuple[Any, Path]]:
    """family -> (transformers model, its save_pretrained directory), each family built at most once for the
    fixture that holds the factory: module fixtures ask for families as their tests need them."""

    @functools.cache
    def get(family: str) -> tuple[Any, Path]:
        out = tmp_path_factory.mktemp(family)
        return save_hf_checkpoint(family, out), out

    return get
