"""Tensor parallelism (with optional sequence parallelism) for the native decoder, on DTensor.

Each block is split Megatron-style over the `tp` ranks of one model replica:

* attention: q/k/v are split by output column (each rank computes num_heads / tp query heads and
  num_key_value_heads / tp key/value heads, so grouped-query attention stays local) and o_proj by input row,
  whose partial sums are reduced on the way out; the MLP likewise (gate/up by column, down by row).
* with `sequence_parallel` (the default) the residual stream and the RMSNorms between those matmuls are
  sharded along the sequence (Shard(1)): each rank normalises T / tp positions, the block's input is
  all-gathered before the column-split matmuls and the row-split outputs are reduce-scattered back, the
  same arithmetic with activations / tp outside attention and the MLP. Without it the stream is whole on
  every rank and the row-split outputs are all-reduced.
* Qwen3's per-head q/k norms see only this rank's heads: their (replicated) weights are DTensors over the
  head dimension, so their gradient is summed over the tp ranks like any replicated parameter's.
* the embedding, the final norm and the LM head stay whole on every rank (not split): the loss code, tied
  embeddings and the chunked loss then run unchanged, at the price of those weights' memory on every tp rank.
  Every tp rank computes the same head and loss from the same gathered hidden states, so their gradients
  agree without a collective.

The model must be the native `Transformer`, before FSDP2 and before it is materialised (on the meta
device): parameters become DTensors here and FSDP2 then shards them further over the data-parallel ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from trainer.model_config import ModelConfig

log = logging.getLogger(__name__)


class TensorParallelError(ValueError):
    """The model or the data does not fit parallel.tp; the message says which sizes and what would."""


def check_model(config: ModelConfig, tp: int) -> None:
    """Refuse a model whose heads or MLP width do not split evenly over `tp` ranks."""
    sizes = {"num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
             "intermediate_size": config.intermediate_size}
    bad = {k: v for k, v in sizes.items() if v % tp}
    if bad:
        shown = ", ".join(f"{k} = {v}" for k, v in bad.items())
        raise TensorParallelError(
            f"parallel.tp = {tp} must divide the model's num_attention_heads, num_key_value_heads and "
            f"intermediate_size (each rank keeps whole heads); {shown} is not divisible by {tp}. "
            f"tp values that fit: {', '.join(str(d) for d in _divisors(sizes))}")


def _divisors(sizes: dict[str, int]) -> list[int]:
    return [d for d in range(1, max(sizes.values()) + 1) if all(v % d == 0 for v in sizes.values())]


def check_sequence(seq_length: int, tp: int, sequence_parallel: bool) -> None:
    """Sequence parallelism splits every packed row into tp equal slices."""
    if sequence_parallel and seq_length % tp:
        raise TensorParallelError(
            f"parallel.sequence_parallel shards each row's {seq_length} positions over parallel.tp = {tp} "
            f"ranks, which needs seq_length divisible by {tp}: re-pack with --seq-length "
            f"{seq_length + tp - seq_length % tp}, or set parallel.sequence_parallel: false")


def apply_tensor_parallel(model: nn.Module, tp_mesh, *, sequence_parallel: bool = True) -> nn.Module:
    """Turn the native model's block parameters into tp-sharded DTensors and install the layout hooks."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    from trainer.model import Transformer

    if not isinstance(model, Transformer):
        raise TensorParallelError(f"parallel.tp > 1 needs a native model (llama, mistral, qwen2, qwen3); got "
                                  f"{type(model).__name__} (model.backend hf)")
    tp = tp_mesh.size()
    check_model(model.config, tp)
    stream = Shard(1) if sequence_parallel else Replicate()  # the residual stream's layout between blocks
    if sequence_parallel:
        parallelize_module(model, tp_mesh, {
            # The lookup runs whole; each rank keeps its slice of positions (backward: all-gather).
            "model.embed_tokens": PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1)),
            # Gather the positions back before the final norm and the (whole) LM head.
            "model.norm": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                             use_local_output=True),
        })
    for layer in model.model.layers:
        plan = {
            # Attention's inputs are (x, cos, sin, ctx, cache, prefix): only x is distributed.
            "self_attn": PrepareModuleInput(input_layouts=(stream, None, None, None, None, None),
                                            desired_input_layouts=(Replicate(), None, None, None, None, None)),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=stream),
            "mlp": PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),)),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=stream),
        }
        if sequence_parallel:
            plan["input_layernorm"] = SequenceParallel()
            plan["post_attention_layernorm"] = SequenceParallel()
        if layer.self_attn.q_norm is not None:
            # [B, T, heads / tp, head_dim]: sharded over dim 2 (this rank's heads), normalised over the last.
            plan["self_attn.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
            plan["self_attn.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        parallelize_module(layer, tp_mesh, plan)
    log.info("tensor parallel over %d ranks (sequence parallel %s)", tp, "on" if sequence_parallel else "off")
    return model


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float | None) -> float:
    """Clip the global gradient norm of parameters that live on different meshes; return the norm.

    Under tensor parallelism some gradients are tp-sharded DTensors (FSDP2 may shard them again over the
    data-parallel ranks), others replicated ones or plain tensors (the whole embedding and head). torch's
    clip_grad_norm_ stacks every gradient's norm into one tensor, which mixed layouts cannot do; here each
    group of one layout gets its norm (a collective over its own mesh), and the squares are summed.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    groups: dict[object, list[torch.Tensor]] = {}
    for g in grads:
        key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
    squares = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm(group, 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.float().to(grads[0].device).pow(2))
    total = float(torch.stack(squares).sum().sqrt())
    if max_norm is not None:
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            with torch.no_grad():
                for g in grads:
                    g.mul_(coef)
    return total
