"""Context parallelism for long packed rows: all-gather the keys/values, keep the queries local.

The cp ranks of one data-parallel group read the same rows; each keeps a contiguous 1/cp slice of every row's
T positions (rank r: positions [r T/cp, (r+1) T/cp)). Embeddings, norms, MLPs, the head and the loss are
per-token and run on the slice unchanged. Attention is the one place a token needs the others: every layer
all-gathers K and V (after RoPE) over the cp group and attends its T/cp local queries to the row's T keys with
the per-document causal mask built from global indices (query i of the slice is row position offset + i). This
is the all-gather variant Llama 3's training used: with grouped-query attention K/V are a fraction of the
activations, and the per-document mask needs no load balancing of the ring schedule.

Why sdpa with an explicit boolean mask [B, 1, T/cp, T]: it runs on every device and dtype, and the mask is
what makes documents that straddle the split exact (a key before the slice, in the same document, is seen). The
varlen / flex kernels would take a cross-rank document structure their calls here are not built for, so they
are refused with cp > 1 (see `prepare_attention`). PyTorch's experimental `context_parallel` API (ring
attention, CUDA) shards sdpa with plain causal masking, not the per-document masks packed rows need.

The gather is torch's autograd-aware functional all-gather (`all_gather_single_autograd`), whose backward
reduce-scatters: every rank's gradient for a slice is summed onto the rank that owns it (gloo and NCCL).

Positions are the loader's `position_ids`, computed from the whole row before slicing, so each token keeps its
RoPE position; labels are pre-shifted, so a slice's labels are already right. The loss denominator is the
whole row's trainable-token count (the loader's, unsliced); the loss sums are added over the cp ranks.
Gradients: FSDP2 shards over the flattened dp_shard x cp mesh (`trainer.distributed`), so its reduce-scatter
already sums the cp ranks' partial gradients; the loop's scale undoes its average over dp x cp ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from trainer import attention

log = logging.getLogger(__name__)

SLICED_KEYS = ("input_ids", "labels", "position_ids")


class ContextParallelError(ValueError):
    """The data or the model setup does not fit parallel.cp; the message names the keys and values."""


def check_sequence(seq_length: int, cp: int) -> None:
    """Every row is cut into cp equal contiguous slices."""
    if seq_length % cp:
        raise ContextParallelError(
            f"parallel.cp = {cp} splits each packed row's seq_length = {seq_length} positions into {cp} equal "
            f"slices, which needs seq_length divisible by {cp}: re-pack with --seq-length "
            f"{seq_length + cp - seq_length % cp}, or change parallel.cp")


@dataclass(frozen=True)
class ContextParallel:
    """This rank's place in its cp group: what the model's attention needs to gather and mask."""

    group: Any  # torch.distributed ProcessGroup of the cp ranks
    rank: int
    size: int

    def offset(self, local_len: int) -> int:
        """Row position of this rank's first token."""
        return self.rank * local_len

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T/cp, ...] -> [B, T, ...] in rank order; autograd sends each slice's gradient back to its owner."""
        from torch.distributed._functional_collectives import all_gather_single_autograd

        # It gathers along dim 0: put the sequence first, and back.
        full = all_gather_single_autograd(x.movedim(1, 0).contiguous(), 0, self.group)
        return full.movedim(0, 1)


def local_slice(batch: dict[str, Any], cp: ContextParallel | None) -> dict[str, Any]:
    """This rank's slice of a device batch's per-position tensors; cu_seqlens, max_seqlen and num_trainable
    stay those of the whole rows (the attention mask and the loss denominator need them)."""
    if cp is None:
        return batch
    t = batch["input_ids"].shape[1]
    check_sequence(t, cp.size)
    n = t // cp.size
    out = dict(batch)
    for key in SLICED_KEYS:
        out[key] = batch[key][:, cp.rank * n:(cp.rank + 1) * n]
    if "doc_len_sq_sum" in batch:  # the FLOPs count: this rank's share of the rows' attention, on average
        out["doc_len_sq_sum"] = batch["doc_len_sq_sum"] // cp.size
    return out


def prepare_attention(
    cp: ContextParallel,
    backend: str,
    batch: int,
    local_len: int,
    device: torch.device,
    cu_seqlens: torch.Tensor | None,
    windows: Iterable[int | None] = (None,),
    prefix_len: int = 0,
) -> attention.AttentionContext:
    """The attention context of this rank's slice: masks [B or 1, 1, T/cp, T] of local queries over the row's
    keys, causal in row positions and confined to documents (and sliding windows), shared by every layer."""
    if backend not in ("auto", "sdpa"):
        raise ContextParallelError(f"model.attn_backend {backend!r} is not implemented with parallel.cp > 1 (the "
                                   "keys are gathered over ranks and masked for sdpa); set model.attn_backend: "
                                   "sdpa (or auto)")
    if prefix_len:
        raise ContextParallelError("prefix tuning (peft.pet_type prefix_tuning) is not implemented with "
                                   "parallel.cp > 1")
    full = local_len * cp.size
    ctx = attention.AttentionContext(backend="sdpa", batch=batch, seqlen=local_len, device=device, cp=cp)
    offset = cp.offset(local_len)
    q_idx = torch.arange(offset, offset + local_len, device=device)
    k_idx = torch.arange(full, device=device)
    causal = (k_idx[None, :] <= q_idx[:, None]).unsqueeze(0)  # [1, T/cp, T]
    same_doc = None
    if cu_seqlens is not None:
        seg = attention.segment_ids_from_cu_seqlens(cu_seqlens.to(device=device, dtype=torch.int64), batch, full)
        same_doc = seg[:, offset:offset + local_len, None] == seg[:, None, :]  # [B, T/cp, T]
    for w in dict.fromkeys(windows):
        mask = causal if w is None else causal & (q_idx[:, None] - k_idx[None, :] < w).unsqueeze(0)
        if same_doc is not None:
            mask = mask & same_doc
        ctx.masks[w] = mask.unsqueeze(1)
    return ctx


def context_parallel_of(info: Any) -> ContextParallel | None:
    """The ContextParallel of a `trainer.distributed.DistInfo`, or None when parallel.cp is 1."""
    if info.cp_mesh is None:
        return None
    return ContextParallel(info.cp_mesh.get_group(), info.cp_mesh.get_local_rank(), info.cp_mesh.size())
