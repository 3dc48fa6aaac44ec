"""AdamW with the usual exclusions, and the warmup + decay learning-rate schedule.

Weight decay on a norm's scale or a bias pulls it toward zero for no benefit, so only matrices
(ndim >= 2: projections and embeddings) are decayed. Only trainable parameters reach the optimizer,
so frozen base weights (LoRA) cost no optimizer state. LoRA+ gives the B matrices (`lora_B`,
`lora_embedding_B`) their own learning rate, lr x ratio; the schedule scales every group alike.

`train.optimizer: adamw_8bit` keeps AdamW's two moments in 8 bits (bitsandbytes' blockwise-quantised AdamW8bit,
2 bytes per parameter instead of 8), for full fine-tuning where the optimizer state dominates memory. The
update is close to, not equal to, fp32 AdamW. It needs the optional `bitsandbytes` package.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.config import TrainSection


def param_groups(
    model: nn.Module, weight_decay: float, lr: float | None = None, loraplus_lr_ratio: float | None = None
) -> list[dict]:
    decay, no_decay, lora_b = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if loraplus_lr_ratio is not None and name.endswith(("lora_B", "lora_embedding_B")):
            lora_b.append(param)
        else:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if lora_b:
        if lr is None:
            raise ValueError("LoRA+ needs the base learning rate")
        groups.append({"params": lora_b, "weight_decay": weight_decay, "lr": lr * loraplus_lr_ratio})
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module, cfg: TrainSection, loraplus_lr_ratio: float | None = None
) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.lr, loraplus_lr_ratio)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if cfg.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("train.optimizer adamw_8bit needs the bitsandbytes package "
                              "(pip install bitsandbytes)") from None
        if any(hasattr(p, "device_mesh") for g in groups for p in g["params"]):
            raise ValueError("train.optimizer adamw_8bit does not support FSDP2-sharded parameters (several "
                             "ranks); use adamw")
        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    # On CPU a plain per-parameter loop (foreach=False) gives identical results with or without DTensors, which
    # the bitwise resume tests rely on; on CUDA the fused kernel saves hundreds of launches per step.
    on_cuda = groups[0]["params"][0].device.type == "cuda"
    # The fused kernel takes a whole group's tensors in one call, which DTensor allows only on one mesh (or
    # none): tensor parallelism leaves the embedding and head whole beside tp-sharded blocks.
    one_mesh = len({getattr(p, "device_mesh", None) for g in groups for p in g["params"]}) == 1
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             foreach=False, fused=True if on_cuda and one_mesh else None)


def warmup_steps(cfg: TrainSection, total_steps: int) -> int:
    """`warmup_steps` when set, else `warmup_ratio` of the run's steps (the config allows only one of them)."""
    return cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)


def lr_factor(step: int, cfg: TrainSection, total_steps: int) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup, then the schedule."""
    warmup = warmup_steps(cfg, total_steps)
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    floor = cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainSection, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))
