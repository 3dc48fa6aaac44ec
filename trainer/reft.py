"""LoReFT (Wu et al. 2024, "ReFT: Representation Finetuning"): learned edits of hidden states, not of weights.

At every chosen layer the block's output h (the residual stream after the MLP) is replaced, at chosen token
positions only, by

    h + R^T (W h + b - R h)

with R [r, d] of orthonormal rows and (W, b) a Linear d -> r. The base model stays frozen; R, W, b train.

Where it lives: each chosen `DecoderLayer` gets a `reft` child (`LoreftIntervention`), so FSDP2 shards it with
its block, DCP checkpoints it with the other trainable parameters and `is_adapter_param` (the `.reft.` mark)
keeps it out of the base checkpoint's keys. The model applies it to its block's output where the boolean
`intervene` mask [B, T] says.

Which positions (`peft.reft_positions`, pyreft's / PaddleNLP's "f<k>+l<k>"): the first k and the last k tokens
of each document's *prompt*. In a packed row each document is a segment of `cu_seqlens`; its prompt runs from
its start up to and including the position whose label is the document's first trained label (that position
reads the last prompt token and predicts the first answer token); a document without trained labels is prompt
throughout. So a multi-turn document's prompt ends where its first trained answer starts. A prompt shorter than
first + last gets every position intervened once (the two sets overlap, they are not applied twice). The
padding tail of a row is a segment without labels: it is intervened too, which changes nothing (no loss there,
no attention across segments). At generation time the prompt is what the caller gives, so the same positions of
it are intervened during prefill; generated tokens are not intervened (as pyreft generates), they only attend to
the prompt's (intervened) keys and values. One intervention per layer serves the first and the last positions
(pyreft's `share_weights=True`).

Orthonormal R: the parameter `rotation` is unconstrained and R is its rows orthonormalised by QR (signs fixed so
an orthonormal input is returned unchanged) in every forward, so R is orthonormal after any optimizer step. Why
not `torch.nn.utils.parametrizations.orthogonal`: its default map keeps a [d, d] buffer per layer drawn from the
global RNG when it is registered, and registering runs a QR on the weight, which a meta-device model (FSDP2's
starting point) cannot do; a QR per layer per forward of a [d, r] matrix costs little.

On disk (peft has no LoReFT, so the format is this project's): `adapter_config.json` with `peft_type: "LOREFT"`,
`r`, `layers`, `positions`, `hidden_size`, `base_model_name_or_path`, and `adapter_model.safetensors` with
`model.layers.<i>.reft.rotation` (R itself, orthonormal rows, [r, d]), `.reft.source_weight` (W, [r, d]) and
`.reft.source_bias` (b, [r]) in fp32. `trainer generate` / `predict` load it as an adapter; merging is refused:
an edit at chosen positions is not a weight change.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.reft_positions import ReftError, ReftPositions, packed_mask, parse_layers, prompt_mask

log = logging.getLogger(__name__)

PEFT_TYPE = "LOREFT"
MODULE = "reft"  # the DecoderLayer child's name; `.reft.` marks adapter parameters (trainer.lora.ADAPTER_MARKS)
PARAMS = ("rotation", "source_weight", "source_bias")

__all__ = ["LoreftIntervention", "ReftError", "ReftPositions", "apply_reft", "apply_reft_adapter", "init_reft",
           "packed_mask", "parse_layers", "prompt_mask", "reft_config", "reft_state"]
def orthonormal_rows(a: torch.Tensor) -> torch.Tensor:
    """The rows of `a` [r, d] (r <= d) orthonormalised by QR, each kept on the side of its own direction."""
    with torch.autocast(a.device.type, enabled=False):
        q, upper = torch.linalg.qr(a.float().t())  # q [d, r]
        signs = torch.where(torch.diagonal(upper) < 0, -1.0, 1.0)
        return (q * signs).t()


class LoreftIntervention(nn.Module):
    """h <- h + R^T (W h + b - R h) where `mask` is True; fp32 parameters, compute in h's dtype."""

    def __init__(self, hidden_size: int, rank: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        if not 1 <= rank <= hidden_size:
            raise ReftError(f"peft.reft_rank {rank} must be in 1..hidden_size ({hidden_size})")
        kw = {"device": device, "dtype": torch.float32}
        self.rotation = nn.Parameter(torch.empty(rank, hidden_size, **kw))
        self.source_weight = nn.Parameter(torch.empty(rank, hidden_size, **kw))
        self.source_bias = nn.Parameter(torch.empty(rank, **kw))
        self.rank, self.hidden_size = rank, hidden_size

    def rotation_matrix(self) -> torch.Tensor:
        """R [r, d] with orthonormal rows, as the forward uses it (fp32)."""
        return orthonormal_rows(self.rotation)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        r = self.rotation_matrix().to(h.dtype)
        source = F.linear(h, self.source_weight.to(h.dtype), self.source_bias.to(h.dtype))
        edit = (source - F.linear(h, r)) @ r
        return torch.where(mask[..., None], h + edit, h)


# --------------------------------------------------------------------------------------------- surgery


def apply_reft(model: nn.Module, cfg: Any) -> list[str]:
    """Give the chosen native decoder layers a `reft` intervention (on the meta model, before sharding)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not hasattr(model, "reft_positions"):
        raise ReftError("peft.pet_type loreft needs the native decoder (model.backend: native)")
    positions = ReftPositions.parse(cfg.reft_positions)
    chosen = parse_layers(cfg.reft_layers, len(layers))
    hidden = model.config.hidden_size
    device = next(model.parameters()).device
    for i in chosen:
        layers[i].reft = LoreftIntervention(hidden, cfg.reft_rank, device)
    model.reft_positions = positions
    return [f"model.layers.{i}" for i in chosen]


def interventions(model: nn.Module) -> list[tuple[int, LoreftIntervention]]:
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    return [(i, layer.reft) for i, layer in enumerate(layers) if getattr(layer, "reft", None) is not None]


@torch.no_grad()
def init_reft(model: nn.Module, seed: int) -> None:
    """R orthonormal (QR of a Gaussian, as pyreft's orthogonal_ init), W and b as nn.Linear(d, r) initialises
    them, each from a generator of (seed, layer name): the same start on 1 or N ranks."""
    from trainer.distributed import assign_full
    from trainer.peft_methods import adapter_generator
    from trainer.weights import _reshard_fsdp

    _reshard_fsdp(model)
    for i, module in interventions(model):
        gen = adapter_generator(seed, f"model.layers.{i}.{MODULE}")
        r, d = module.rank, module.hidden_size
        rotation = orthonormal_rows(torch.empty(r, d).normal_(generator=gen))
        weight = torch.empty(r, d)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=gen)
        bound = 1 / math.sqrt(d)
        bias = torch.empty(r).uniform_(-bound, bound, generator=gen)
        for name, value in zip(PARAMS, (rotation, weight, bias), strict=True):
            assign_full(getattr(module, name), value)


# --------------------------------------------------------------------------------------------- on disk


def reft_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The file's tensors (R orthonormalised). Collective under FSDP2: every rank must call it."""
    from trainer.weights import _reshard_fsdp

    _reshard_fsdp(model)
    out = {}
    for i, module in interventions(model):
        key = f"model.layers.{i}.{MODULE}"
        full = {}
        for name in PARAMS:
            p = getattr(module, name)
            p = p.full_tensor() if hasattr(p, "full_tensor") else p
            full[name] = p.detach().to("cpu", torch.float32)
        out[f"{key}.rotation"] = orthonormal_rows(full["rotation"]).contiguous()
        out[f"{key}.source_weight"] = full["source_weight"].contiguous().clone()
        out[f"{key}.source_bias"] = full["source_bias"].contiguous().clone()
    return out


def reft_config(model: nn.Module, cfg: Any, base_model: str | None) -> dict[str, Any]:
    return {
        "peft_type": PEFT_TYPE,
        "format": "sftkit LoReFT: h <- h + R^T (W h + b - R h) on the outputs of `layers` at `positions`; "
                  "model.layers.<i>.reft.rotation = R [r, d] (orthonormal rows), .source_weight = W [r, d], "
                  ".source_bias = b [r]",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.reft_rank,
        "layers": [i for i, _ in interventions(model)],
        "positions": str(model.reft_positions),
        "hidden_size": model.config.hidden_size,
        "inference_mode": True,
    }


def is_reft_adapter(config: dict[str, Any]) -> bool:
    return config.get("peft_type") == PEFT_TYPE


@torch.no_grad()
def apply_reft_adapter(model: nn.Module, path: str | Path, config: dict[str, Any]) -> list[str]:
    """Add a saved LoReFT adapter's interventions (`path`: its safetensors file, `config`: its parsed
    adapter_config.json) to a loaded native model; nothing is merged."""
    from safetensors.torch import load_file

    from trainer.weights import WeightsError

    path = Path(path)
    adapter_dir = path.parent
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not hasattr(model, "reft_positions"):
        raise WeightsError(f"{adapter_dir}: a LoReFT adapter needs the native decoder; this model is not one")
    try:
        positions = ReftPositions.parse(str(config["positions"]))
        chosen = parse_layers(list(config["layers"]), len(layers))
        rank = int(config["r"])
    except (KeyError, TypeError, ValueError) as exc:
        raise WeightsError(f"{adapter_dir / 'adapter_config.json'}: not a valid LoReFT config ({exc})") from None
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (a LoReFT adapter directory holds adapter_config.json and "
                                f"{path.name})")
    tensors = load_file(path)
    hidden = model.config.hidden_size
    device = next(model.parameters()).device
    expected = {f"model.layers.{i}.{MODULE}.{p}" for i in chosen for p in PARAMS}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise WeightsError(f"{path}: tensors do not match the config's layers (missing {missing[:4]}, "
                           f"unexpected {extra[:4]})")
    for i in chosen:
        module = LoreftIntervention(hidden, rank, device)
        for name in PARAMS:
            t = tensors[f"model.layers.{i}.{MODULE}.{name}"]
            if tuple(t.shape) != tuple(getattr(module, name).shape):
                raise WeightsError(f"{path}: model.layers.{i}.{MODULE}.{name} has shape {tuple(t.shape)}, "
                                   f"expected {tuple(getattr(module, name).shape)} (hidden size {hidden}, r {rank})")
            getattr(module, name).copy_(t)
        layers[i].reft = module
    model.reft_positions = positions
    log.info("applied LoReFT adapter %s to layers %s (r=%d, positions %s)", adapter_dir, chosen, rank, positions)
    return [f"model.layers.{i}" for i in chosen]
