"""Quantized frozen bases (QLoRA): the frozen Linear weights of the decoder stored as NF4, adapters in fp32.

Library: torchao's `NF4Tensor` (QLoRA's 4-bit NormalFloat with double quantization: one absmax per block of
`qlora_weight_blocksize` weights, those absmaxes themselves quantized to int8 per `double_quant_block_size`).
Chosen over bitsandbytes because it is written in plain torch ops, so the same code runs on CPU (the tests)
and CUDA, and because it implements FSDP2's all-gather extension (`fsdp_pre_all_gather`): FSDP2 shards and
gathers the packed 4-bit data itself, so a rank holds only its 4-bit shard between uses.

Flow, fitted into the trainer's meta build (see `trainer.loop.build_model`):
1. `quantize_frozen_base` (meta model, after freezing, before sharding) turns each eligible frozen Linear
   weight into a meta `NF4Tensor`; FSDP2 then shards it like any parameter and `materialize` gives each rank
   storage for its own 4-bit shard only.
2. `load_hf_weights` streams the checkpoint tensor by tensor; for an NF4 parameter it calls `load_quantized`,
   which quantizes that one tensor on the parameter's device and keeps this rank's rows. One full-precision
   tensor exists at a time, never the whole model: quantizing a whole tensor (not only this rank's rows) is
   what makes the result independent of the world size, because NF4's double quantization subtracts the mean
   of all the tensor's block scales.

Eligible, on the native and the hf backend alike: every frozen `nn.Linear` weight inside the decoder layers
(fused MoE expert tensors are not Linear modules and stay as they are) whose size is a multiple of
blocksize x double_quant_block_size (all of them in real models). Embeddings, the LM head, norms and biases
stay in `model.frozen_dtype`; tensors that do not divide are left unquantized and reported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from trainer.config import PeftSection

log = logging.getLogger(__name__)


@dataclass
class QuantReport:
    quantized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # eligible by kind, not by size


def _nf4_class():
    # torchao logs a warning for each CUDA kernel library it cannot load (every CPU-only machine): not news.
    logging.getLogger("torchao").setLevel(max(logging.getLogger("torchao").level, logging.ERROR))
    try:
        from torchao.quantization import NF4Tensor
    except ImportError as exc:  # pragma: no cover - torchao is a dependency
        raise ImportError("peft.weight_quantize_algo nf4 needs torchao (pip install torchao)") from exc
    return NF4Tensor


def is_quantized(t: torch.Tensor) -> bool:
    """True for an NF4 weight (or its FSDP2 local shard)."""
    # By name: importing torchao for every loaded tensor of an unquantized run would cost seconds for nothing.
    return type(getattr(t, "_local_tensor", t)).__name__ == "NF4Tensor"


def quantize_frozen_base(model: nn.Module, cfg: PeftSection, dtype: torch.dtype) -> QuantReport:
    """Replace eligible frozen Linear weights of the (meta) model by NF4 weights holding `dtype` values.

    Call after `setup_peft` and `store_frozen_in`, before sharding (the native `Transformer` or the hf backend's
    `HFCausalLM`). Under torch.distributed a quantized
    tensor must split evenly into whole double-quantization blocks per rank; otherwise this raises, naming it.
    """
    report = QuantReport()
    if cfg.weight_quantize_algo is None:
        return report
    nf4 = _nf4_class()
    block, scaler_block = cfg.qlora_weight_blocksize, cfg.qlora_weight_double_quant_block_size
    unit = block * scaler_block
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or ".layers." not in f".{name}" or module.weight.requires_grad:
            continue
        key = name.replace(".base_layer", "")
        weight = module.weight
        if weight.numel() % unit:
            report.skipped.append(key)
            continue
        rows = weight.shape[0]
        if world > 1 and (rows % world or (weight.numel() // world) % unit):
            raise ValueError(f"peft.weight_quantize_algo: {key} ({tuple(weight.shape)}) does not split into whole "
                             f"blocks of {unit} weights over {world} ranks; lower qlora_weight_double_quant_block_size")
        with torch.no_grad():
            q = nf4.from_tensor(weight.detach().to(dtype), block, scaler_block)
        module.weight = nn.Parameter(q, requires_grad=False)
        report.quantized.append(key)
    if report.skipped:
        log.warning("weight_quantize_algo %s: %d frozen Linear weights left in %s (size not a multiple of %d): %s",
                    cfg.weight_quantize_algo, len(report.skipped), str(dtype).removeprefix("torch."), unit,
                    ", ".join(report.skipped[:6]) + (" ..." if len(report.skipped) > 6 else ""))
    log.info("weight_quantize_algo %s: %d Linear weights quantized (block %d, double-quant block %d)",
             cfg.weight_quantize_algo, len(report.quantized), block, scaler_block)
    return report


@torch.no_grad()
def quantize_like(target: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` quantized exactly as the NF4 `target` is laid out (same dtype, block sizes, device)."""
    return _nf4_class().from_tensor(full.to(device=target.device, dtype=target.dtype).contiguous(),
                                    target.block_size, target.scaler_block_size)


@torch.no_grad()
def load_quantized(param: torch.Tensor, full: torch.Tensor) -> None:
    """Quantize one checkpoint tensor into an NF4 parameter, keeping only this rank's rows under FSDP2.

    The inner tensors of the (possibly sharded) NF4 parameter are written in place, so FSDP2's references to
    them stay valid; the scale mean and the code table, which FSDP2 does not shard, are set on the object.
    """
    local = getattr(param, "_local_tensor", param)
    whole = quantize_like(local, full)
    if local is not param:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(full.shape, param.device_mesh, param.placements)
        if shape[0] == 0:
            return
        chunks = torch.split(whole, shape[0], dim=0)  # splits the 4-bit data and its scales by rows
        whole = chunks[offset[0] // shape[0]]
    for attr in ("quantized_data", "quantized_scalers", "quantization_factor"):
        getattr(local, attr).copy_(getattr(whole, attr))
    local.scaler_mean = whole.scaler_mean
    local.nf4 = whole.nf4


def dequantized(param: torch.Tensor) -> torch.Tensor:
    """The full-precision values an NF4 parameter stands for (gathered under FSDP2: a collective)."""
    full = param.full_tensor() if hasattr(param, "full_tensor") else param
    return full.get_original_weight()
