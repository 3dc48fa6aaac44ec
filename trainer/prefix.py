"""Prefix tuning (Li & Liang 2021; peft's PREFIX_TUNING, PaddleNLP's prefix_tuning): learned keys and values that
every query of every layer attends to before the real tokens. The base model stays frozen.

Where it lives: each native `DecoderLayer` gets a `prefix` child (`LayerPrefix`: `key` and `value`, each
[num_virtual_tokens, kv_heads, head_dim] in fp32), so FSDP2 shards it with its block, DCP checkpoints it with the
other trainable parameters, and the `.prefix.` mark (`trainer.lora.ADAPTER_MARKS`) keeps it out of the base
checkpoint's keys. Its attention sees the layer's prefix keys first (`trainer.attention.attend(..., prefix=)`).

With `peft.prefix_projection` (peft's PrefixEncoder, PaddleNLP's switch of the same name) the prefixes are instead
the output of one MLP, Embedding [P, token_dim] -> Linear(token_dim, encoder_hidden_size) -> tanh ->
Linear(encoder_hidden_size, L * 2 * token_dim), token_dim = kv_heads x head_dim, read as the prefixes exactly as
the plain file is (below). Its last Linear writes every layer's prefix, so it belongs to no block: it is
`model.model.prefix` (`PrefixEncoder`), a child of the decoder body beside `embed_tokens`, and the layers get no
`prefix` child. That places it in FSDP2's root group, gathered for the whole forward and reduce-scattered after
the backward like the embeddings, so no block has to gather another's parameters; DCP checkpoints it under
`model.prefix.*` (the `.prefix.` mark again). `Transformer.hidden_states` runs it once per forward, before the
blocks, and hands each block its slice as an argument: an activation-checkpointed block recomputes only its own
attention from that slice, never the MLP, and the gradient of all L slices meets in the MLP once.

What peft does, and so what this does (checked against peft 0.21 / transformers 5 in tests/test_prefix_tuning.py):

- peft hands the prefix to the HF model as `past_key_values` (a cache already holding P = num_virtual_tokens
  slots per layer). Cached keys are used as they are: the prefix keys get no RoPE rotation, ever. They are the
  learned vectors, shaped [kv_heads, head_dim] (peft sizes them from num_key_value_heads, so grouped-query
  models share a prefix key across the heads of a group exactly as they share real keys).
- The real tokens come after the cache: transformers numbers them from the cache's length, so their RoPE
  positions are P, P+1, ... (and peft shifts explicit position_ids by P too). RoPE on real-to-real scores only
  sees differences of positions, but the scores against the unrotated prefix keys do depend on the absolute
  position, so this matters: the native model adds `prefix_tokens` to every position id it rotates by.
- Every real token sees all P prefix slots (peft prepends ones to the attention mask), then its causal past.

Packed rows: every document sees the same prefix and its own causal past, and its positions restart at P (as the
document alone would have them under peft), so a packed row equals its documents run one at a time. Only the sdpa
attention backend takes a prefix (`auto` becomes sdpa); varlen / flex are refused with a message, as are
sliding-window layers.

Init: peft's default (`init_weights` unset): the prefix is an `nn.Embedding`, so every entry is normal(0, 1), drawn
here per layer from a generator of (seed, layer name) so 1 and N ranks start alike. With prefix_projection, the
whole MLP draws from one generator of (seed, `model.prefix`) in the order and with the draws torch makes when peft
builds its PrefixEncoder (embedding normal(0, 1), then each Linear's kaiming-uniform weight and uniform bias), so
the MLP is peft's under `torch.manual_seed` of that generator's seed.

On disk, peft's format: `adapter_config.json` with `peft_type: PREFIX_TUNING`, `num_virtual_tokens`,
`num_layers`, `token_dim` = kv_heads x head_dim, `num_attention_heads` = kv_heads (what peft writes for a
grouped-query model) and `inference_mode: true`; `adapter_model.safetensors` holds one tensor, `prompt_embeddings`
[P, num_layers * 2 * token_dim], whose row p is, layer by layer, that layer's key then value of slot p (heads
outer, head_dim inner), which is how peft's `get_prompt` reads its embedding. With prefix_projection, peft saves the
MLP's output in that same tensor (the MLP itself is not kept), writing `prefix_projection: true` and
`encoder_hidden_size`; the export here evaluates the MLP and does the same. `PeftModel.from_pretrained` loads it;
`trainer generate` / `predict` load it too (the prefix goes into the KV cache's first slots before the prompt's
prefill). Merging is refused: attending to extra keys is not a weight change.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

PEFT_TYPE = "PREFIX_TUNING"
# The DecoderLayer child's name (the body's, `model.prefix`, with prefix_projection); `.prefix.` marks adapter
# parameters (trainer.lora.ADAPTER_MARKS).
MODULE = "prefix"
TENSOR = "prompt_embeddings"  # peft's key for a prompt-learning adapter's weights

__all__ = ["LayerPrefix", "PrefixEncoder", "PrefixError", "apply_prefix", "apply_prefix_adapter", "fill_cache",
           "init_prefix", "prefix_config", "prefix_state", "prefix_values", "prefixes"]


class PrefixError(ValueError):
    """A prefix-tuning setting, model or file is unusable; the message names the key or the file."""


class LayerPrefix(nn.Module):
    """One layer's learned key and value slots [P, kv_heads, head_dim] (fp32; cast to the keys' dtype in use)."""

    def __init__(self, n_tokens: int, kv_heads: int, head_dim: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": torch.float32}
        self.key = nn.Parameter(torch.empty(n_tokens, kv_heads, head_dim, **kw))
        self.value = nn.Parameter(torch.empty(n_tokens, kv_heads, head_dim, **kw))


def _mlp(embedding: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, w1: torch.Tensor,
         b1: torch.Tensor) -> torch.Tensor:
    """The reparametrisation [P, token_dim] -> [P, L * 2 * token_dim]: one definition for training and export."""
    return nn.functional.linear(torch.tanh(nn.functional.linear(embedding, w0, b0)), w1, b1)


class PrefixEncoder(nn.Module):
    """prefix_projection's MLP; called with no input (its input is its own embedding), it returns every layer's
    prefix keys and values, [L, 2, P, kv_heads, head_dim]. Names as peft's (`embedding`, `transform.0` / `.2`)."""

    def __init__(self, n_tokens: int, n_layers: int, kv_heads: int, head_dim: int, hidden: int,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": torch.float32}
        token_dim = kv_heads * head_dim
        self.embedding = nn.Embedding(n_tokens, token_dim, **kw)
        self.transform = nn.Sequential(nn.Linear(token_dim, hidden, **kw), nn.Tanh(),
                                       nn.Linear(hidden, n_layers * 2 * token_dim, **kw))
        self.shape = (n_tokens, n_layers, 2, kv_heads, head_dim)

    def forward(self) -> torch.Tensor:
        first, last = self.transform[0], self.transform[2]
        out = _mlp(self.embedding.weight, first.weight, first.bias, last.weight, last.bias)
        return out.view(self.shape).permute(1, 2, 0, 3, 4)  # a row is layer, key / value, head, head_dim


def _encoder(model: nn.Module) -> PrefixEncoder | None:
    encoder = getattr(getattr(model, "model", None), MODULE, None)
    return encoder if isinstance(encoder, PrefixEncoder) else None


def _layers(model: nn.Module) -> Any:
    return getattr(getattr(model, "model", None), "layers", None)


def _check_model(model: nn.Module, where: str) -> None:
    if _layers(model) is None or not hasattr(model, "prefix_tokens"):
        raise PrefixError(f"{where}: prefix tuning needs the native decoder (model.backend: native)")
    config = model.config
    if config.attn_backend not in ("auto", "sdpa"):
        raise PrefixError(f"{where}: model.attn_backend {config.attn_backend!r} cannot attend to the prefix; prefix "
                          "tuning runs on sdpa (set model.attn_backend: sdpa or auto)")
    if any(w is not None for w in config.sliding_windows):
        raise PrefixError(f"{where}: this model has sliding-window attention layers; prefix tuning is not "
                          "implemented for them")


def encoder_hidden_size(model_config: Any, cfg: Any) -> int:
    """peft.encoder_hidden_size, or peft's default when unset: token_dim = kv heads x head_dim."""
    return cfg.encoder_hidden_size or model_config.num_key_value_heads * model_config.head_dim


def apply_prefix(model: nn.Module, cfg: Any) -> list[str]:
    """Give every native decoder layer a `prefix`, or the body one `PrefixEncoder` with prefix_projection (on the
    meta model, before sharding)."""
    _check_model(model, "peft.pet_type prefix_tuning")
    if cfg.num_virtual_tokens < 1:
        raise PrefixError("peft.num_virtual_tokens must be >= 1")
    config = model.config
    device = next(model.parameters()).device
    if cfg.prefix_projection:
        setattr(model.model, MODULE, PrefixEncoder(cfg.num_virtual_tokens, len(_layers(model)),
                                                   config.num_key_value_heads, config.head_dim,
                                                   encoder_hidden_size(config, cfg), device))
    else:
        for layer in _layers(model):
            layer.prefix = LayerPrefix(cfg.num_virtual_tokens, config.num_key_value_heads, config.head_dim, device)
    model.prefix_tokens = cfg.num_virtual_tokens
    return [f"model.layers.{i}" for i in range(len(_layers(model)))]


def prefixes(model: nn.Module) -> list[tuple[int, LayerPrefix]]:
    return [(i, layer.prefix) for i, layer in enumerate(_layers(model) or [])
            if getattr(layer, "prefix", None) is not None]


@torch.no_grad()
def init_prefix(model: nn.Module, seed: int) -> None:
    """peft's default init, from generators of (seed, module name): the same start on 1 or N ranks."""
    from trainer.distributed import assign_full
    from trainer.peft_methods import adapter_generator
    from trainer.weights import _reshard_fsdp

    _reshard_fsdp(model)
    encoder = _encoder(model)
    if encoder is not None:
        gen = adapter_generator(seed, f"model.{MODULE}")
        assign_full(encoder.embedding.weight, torch.empty(encoder.embedding.weight.shape).normal_(generator=gen))
        for linear in (encoder.transform[0], encoder.transform[2]):  # what nn.Linear.reset_parameters draws
            weight = nn.init.kaiming_uniform_(torch.empty(linear.weight.shape), a=math.sqrt(5), generator=gen)
            assign_full(linear.weight, weight)
            bound = 1 / math.sqrt(linear.in_features)
            assign_full(linear.bias, torch.empty(linear.bias.shape).uniform_(-bound, bound, generator=gen))
    for i, module in prefixes(model):
        gen = adapter_generator(seed, f"model.layers.{i}.{MODULE}")
        for p in (module.key, module.value):
            assign_full(p, torch.empty(p.shape).normal_(generator=gen))


def _full(p: torch.Tensor) -> torch.Tensor:
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()


@torch.no_grad()
def prefix_values(model: nn.Module) -> torch.Tensor | None:
    """Every layer's prefix keys and values, [L, 2, P, kv_heads, head_dim] in fp32 on CPU (the MLP evaluated with
    prefix_projection), or None without prefix tuning. Collective under FSDP2: every rank must call it."""
    from trainer.weights import _reshard_fsdp

    _reshard_fsdp(model)
    encoder = _encoder(model)
    if encoder is not None:
        first, last = encoder.transform[0], encoder.transform[2]
        weights = (encoder.embedding.weight, first.weight, first.bias, last.weight, last.bias)
        out = _mlp(*(_full(w).to("cpu", torch.float32) for w in weights))
        return out.view(encoder.shape).permute(1, 2, 0, 3, 4)
    found = prefixes(model)
    if not found:
        return None
    return torch.stack([torch.stack([_full(m.key), _full(m.value)]).to("cpu", torch.float32) for _, m in found])


def prefix_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """peft's `prompt_embeddings` [P, L * 2 * kv * hd]. Collective under FSDP2: every rank must call it."""
    kv = prefix_values(model)  # row p: layer by layer, key then value, heads outer, head_dim inner
    return {TENSOR: kv.permute(2, 0, 1, 3, 4).reshape(kv.shape[2], -1).contiguous()}


def prefix_config(model: nn.Module, cfg: Any, base_model: str | None) -> dict[str, Any]:
    """adapter_config.json as peft writes it for this model (so `PeftModel.from_pretrained` rebuilds the same)."""
    config = model.config
    token_dim = config.num_key_value_heads * config.head_dim
    return {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "num_layers": len(_layers(model)),
        "token_dim": token_dim,
        "num_attention_heads": config.num_key_value_heads,
        "num_transformer_submodules": 1,
        "encoder_hidden_size": encoder_hidden_size(config, cfg),
        "prefix_projection": bool(cfg.prefix_projection),
        "init_weights": None,
        "inference_mode": True,
        "modules_to_save": None,
        "revision": None,
    }


def is_prefix_adapter(config: dict[str, Any]) -> bool:
    return config.get("peft_type") == PEFT_TYPE


@torch.no_grad()
def apply_prefix_adapter(model: nn.Module, path: str | Path, config: dict[str, Any]) -> list[str]:
    """Add a saved peft prefix-tuning adapter (`path`: its safetensors file, `config`: its parsed
    adapter_config.json) to a loaded native model."""
    from safetensors.torch import load_file

    from trainer.weights import WeightsError

    path = Path(path)
    cfg_path = path.parent / "adapter_config.json"
    try:
        _check_model(model, str(path.parent))
    except PrefixError as exc:
        raise WeightsError(str(exc)) from None
    mc = model.config
    layers = _layers(model)
    try:
        n_tokens = int(config["num_virtual_tokens"])
        n_layers, token_dim, heads = int(config["num_layers"]), int(config["token_dim"]), int(config["num_attention_heads"])
    except (KeyError, TypeError, ValueError) as exc:
        raise WeightsError(f"{cfg_path}: not a valid PREFIX_TUNING config ({exc!r})") from None
    want = (len(layers), mc.num_key_value_heads * mc.head_dim, mc.num_key_value_heads)
    if (n_layers, token_dim, heads) != want or config.get("num_transformer_submodules", 1) != 1:
        raise WeightsError(f"{cfg_path}: num_layers / token_dim / num_attention_heads = {n_layers} / {token_dim} / "
                           f"{heads} do not fit this model ({want[0]} / {want[1]} / {want[2]}: layers, kv heads x "
                           "head_dim, kv heads)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (a prefix-tuning adapter directory holds adapter_config.json "
                                f"and {path.name})")
    tensors = load_file(path)
    shape = (n_tokens, n_layers * 2 * token_dim)
    if set(tensors) != {TENSOR} or tuple(tensors[TENSOR].shape) != shape:
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        raise WeightsError(f"{path}: expected one tensor {TENSOR} of shape {shape}, found {got}")
    # With prefix_projection peft saves the MLP's output, so the file is the prefix itself either way.
    kv = tensors[TENSOR].float().view(n_tokens, n_layers, 2, mc.num_key_value_heads, mc.head_dim)
    device = next(model.parameters()).device
    for i, layer in enumerate(layers):
        module = LayerPrefix(n_tokens, mc.num_key_value_heads, mc.head_dim, device)
        module.key.copy_(kv[:, i, 0])
        module.value.copy_(kv[:, i, 1])
        module.requires_grad_(False)
        layer.prefix = module
    model.prefix_tokens = n_tokens
    log.info("applied prefix-tuning adapter %s (%d virtual tokens, %d layers)", path.parent, n_tokens, n_layers)
    return [f"model.layers.{i}" for i in range(n_layers)]


@torch.no_grad()
def fill_cache(model: nn.Module, cache: Any) -> None:
    """Put every layer's prefix in the first slots of a fresh `KVCache`, valid in every row and before every
    position (slot position -1), so the prompt's prefill and each decoded token attend to it as in training.
    Collective under FSDP2 (the prefixes are gathered): every rank must call it."""
    kv = prefix_values(model)
    if kv is None:
        return
    batch = cache.valid.shape[0]
    n = model.prefix_tokens
    device = cache.valid.device
    slots = cache.begin(torch.full((batch, n), -1, device=device, dtype=torch.long),
                        torch.ones(batch, n, device=device, dtype=torch.bool))
    for i in range(kv.shape[0]):
        for store, values in ((cache.k, kv[i, 0]), (cache.v, kv[i, 1])):
            full = values.to(device=device, dtype=store.dtype)
            store[i].index_copy_(1, slots, full.unsqueeze(0).expand(batch, -1, -1, -1))
