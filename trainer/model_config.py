"""Model hyper-parameters read from a Hugging Face `config.json`.

One dataclass covers the dense decoder families we train (Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3). The
family differences are reduced to a handful of switches (biases, q/k norm, RoPE scaling, sliding window) so
the model code never branches on `model_type`. The raw HF dict is kept, with overrides applied, because
export must write a `config.json` that transformers accepts for the model we actually trained.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
ATTN_BACKENDS = ("auto", "sdpa", "flex", "varlen")


def read_config_json(model_dir: str | Path) -> dict[str, Any]:
    """A model directory's config.json as a dict; errors name the file (and the line of a JSON error)."""
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no config.json in the model directory") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return raw


@dataclass
class DecoderDims:
    """The sizes every decoder has, native family or not: one declaration that `ModelConfig` (what the model is
    built from) and `trainer.memory_plan.ModelShape` (what memory is planned from) both extend, so the two
    cannot drift apart in names or meaning."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int


@dataclass
class ModelConfig(DecoderDims):
    model_type: str = "llama"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # HF's rope dict minus rope_theta, e.g. {"rope_type": "llama3", "factor": 8.0, ...}; None = plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # One entry per layer: None = full causal attention, int W = token i sees tokens j with i - j < W.
    sliding_windows: list[int | None] = field(default_factory=list)
    initializer_range: float = 0.02
    attn_backend: str = "auto"
    # The checkpoint's config.json with overrides applied; written back on export.
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {self.attn_backend!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if not self.sliding_windows:
            self.sliding_windows = [None] * self.num_hidden_layers
        if len(self.sliding_windows) != self.num_hidden_layers:
            raise ValueError(
                f"sliding_windows has {len(self.sliding_windows)} entries for {self.num_hidden_layers} layers"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> ModelConfig:
        """Build from a parsed HF config.json.

        Overrides use HF key names (`num_hidden_layers=4`) or our own field names (`attn_backend="sdpa"`);
        HF-named ones are written into the kept raw dict too, so an exported checkpoint describes the
        model that was trained, not the one that was loaded.
        """
        raw = copy.deepcopy(hf)
        own = {f.name for f in fields(cls)} - {"hf_config"}
        ours: dict[str, Any] = {}
        for key, value in overrides.items():
            if key in own and key not in raw:
                ours[key] = value
            else:
                raw[key] = value
                if key == "rope_theta" and isinstance(raw.get("rope_parameters"), dict):
                    raw["rope_parameters"]["rope_theta"] = value  # transformers 5 reads it from there
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in raw:
                raise ValueError(f"config.json lacks required key {key!r}")

        n_layers = int(raw["num_hidden_layers"])
        if isinstance(raw.get("layer_types"), list) and len(raw["layer_types"]) != n_layers:
            # A reduced-depth run keeps the first layers; transformers checks layer_types' length on load.
            raw["layer_types"] = raw["layer_types"][:n_layers]
        n_heads = int(raw["num_attention_heads"])
        head_dim = raw.get("head_dim") or raw["hidden_size"] // n_heads

        rope = _rope_params(raw)
        rope_theta = float(rope.pop("rope_theta", 10000.0))
        if rope.get("rope_type", "default") == "default" and len(rope) <= 1:
            rope_scaling = None
        else:
            rope_scaling = rope

        qkv_bias = bool(raw.get("attention_bias", False))
        o_proj_bias = qkv_bias
        if model_type == "qwen2":  # Qwen2 always has q/k/v biases and never an o_proj bias.
            qkv_bias, o_proj_bias = True, False

        cfg = cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or n_heads),
            head_dim=int(head_dim),
            model_type=model_type,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            hidden_act=str(raw.get("hidden_act", "silu")),
            qkv_bias=qkv_bias,
            o_proj_bias=o_proj_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_windows=_sliding_windows(raw, model_type, n_layers),
            initializer_range=float(raw.get("initializer_range", 0.02)),
            hf_config=raw,
            **ours,
        )
        return cfg

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **overrides: Any) -> ModelConfig:
        return cls.from_hf(read_config_json(model_dir), **overrides)

    def num_params(self) -> int:
        """Parameter count, for logging and FLOPs estimates without building the model."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * q + 2 * h * kv + q * h
        attn += (q + 2 * kv) * self.qkv_bias + h * self.o_proj_bias + 2 * d * self.qk_norm
        mlp = 3 * h * self.intermediate_size + (2 * self.intermediate_size + h) * self.mlp_bias
        per_layer = attn + mlp + 2 * h
        emb = self.vocab_size * h
        return self.num_hidden_layers * per_layer + h + emb * (1 if self.tie_word_embeddings else 2)


def _rope_params(raw: dict[str, Any]) -> dict[str, Any]:
    """Merge transformers 5's `rope_parameters` and 4.x's `rope_theta` + `rope_scaling` into one dict."""
    params = dict(raw.get("rope_parameters") or {})
    legacy = raw.get("rope_scaling")
    if isinstance(legacy, dict):
        for k, v in legacy.items():
            params.setdefault(k, v)
    if "type" in params and "rope_type" not in params:  # very old configs spell it "type"
        params["rope_type"] = params.pop("type")
    params.pop("type", None)
    if "rope_theta" not in params and "rope_theta" in raw:
        params["rope_theta"] = raw["rope_theta"]
    params.setdefault("rope_type", "default")
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        if key in params and params[key] is not None and not math.isfinite(float(params[key])):
            raise ValueError(f"rope parameter {key} must be finite, got {params[key]!r}")
    return params


def _sliding_windows(raw: dict[str, Any], model_type: str, n_layers: int) -> list[int | None]:
    window = raw.get("sliding_window")
    layer_types = raw.get("layer_types")
    if isinstance(layer_types, list):
        return [int(window) if t == "sliding_attention" and window else None for t in layer_types[:n_layers]]
    if model_type == "mistral" and window:
        return [int(window)] * n_layers
    if model_type in ("qwen2", "qwen3") and raw.get("use_sliding_window") and window:
        first = int(raw.get("max_window_layers", n_layers))
        return [int(window) if i >= first else None for i in range(n_layers)]
    return [None] * n_layers
