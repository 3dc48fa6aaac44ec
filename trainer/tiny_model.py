"""Build a small random-init Qwen3-shaped checkpoint in Hugging Face format.

The demo and the end-to-end tests need a model the repository makes itself: no weights can be
downloaded here. The result is an ordinary HF directory (config.json, model.safetensors, tokenizer
files), so the trainer loads it through exactly the path a real Qwen3 checkpoint takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.model import Transformer
from trainer.model_config import ModelConfig
from trainer.weights import export_hf


@dataclass
class TinyShape:
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = True


def qwen3_config(vocab_size: int, shape: TinyShape, eos_token_id: int | None, pad_token_id: int | None) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "initializer_range": 0.02,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def build_tiny_checkpoint(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    *,
    vocab_size: int,
    eos_token_id: int | None,
    pad_token_id: int | None,
    shape: TinyShape | None = None,
    seed: int = 0,
) -> Path:
    """Write a random-init Qwen3-shaped model for the tokenizer in `tokenizer_dir`, tokenizer files included.

    The caller reads the tokenizer (vocabulary size, eos and pad ids): the trainer never loads tokenizers.
    """
    shape = shape or TinyShape()
    config = ModelConfig.from_hf(qwen3_config(vocab_size, shape, eos_token_id, pad_token_id))
    model = Transformer(config)
    model.init_weights(torch.Generator().manual_seed(seed))
    out_dir = Path(out_dir)
    export_hf(model, out_dir, tokenizer_dir=tokenizer_dir, overwrite=True)
    return out_dir
