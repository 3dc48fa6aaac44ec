"""Causal attention over packed rows, with no attention across documents.

A packed batch carries `cu_seqlens` (segment boundaries over the flattened B*T tokens). Three backends turn
that into "attend only inside your own segment, causally":

- `sdpa`:   `F.scaled_dot_product_attention` with a block-diagonal causal boolean mask. Works everywhere
            (the CPU path); costs O(T^2) mask memory per row, fine at CPU sizes.
- `varlen`: `torch.nn.attention.varlen.varlen_attn` (FlashAttention on the flattened tokens). CUDA and
            fp16/bf16 only; no mask at all, and skips the work of masked blocks.
- `flex`:   `flex_attention` with a document `BlockMask`. CUDA; any dtype; also skips masked blocks.

`auto` picks varlen, then flex, then sdpa, by what the tensors allow. The per-forward work (mask, block mask,
segment ids) is done once in `prepare()` and shared by all layers.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

try:  # torch >= 2.9
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # pragma: no cover - depends on the torch build
    _varlen_attn = None

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover
    create_block_mask = flex_attention = None


def varlen_available() -> bool:
    return _varlen_attn is not None and torch.cuda.is_available()


def flex_available() -> bool:
    return flex_attention is not None and torch.cuda.is_available()


# Keyword names differ across torch versions (2.9/2.10: is_causal; 2.11+: window_size; newer: enable_gqa).
_VARLEN_PARAMS = frozenset(inspect.signature(_varlen_attn).parameters) if _varlen_attn is not None else frozenset()


_COMPILED_FLEX = None


def _flex():
    """flex_attention is only fast when compiled: inside a compiled block call it directly (dynamo traces it),
    in eager mode use one compiled copy."""
    global _COMPILED_FLEX
    if torch.compiler.is_compiling():
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """Turn `auto` into a concrete backend for these tensors; reject a forced one that cannot run here."""
    if requested == "sdpa":
        return "sdpa"
    on_cuda = device.type == "cuda"
    half = dtype in (torch.float16, torch.bfloat16)
    if requested == "varlen":
        if not (on_cuda and _varlen_attn is not None and half):
            raise ValueError(
                "attn_backend 'varlen' needs CUDA, fp16/bf16 tensors and torch.nn.attention.varlen "
                f"(device={device.type}, dtype={dtype}, varlen present={_varlen_attn is not None})"
            )
        return "varlen"
    if requested == "flex":
        if not (on_cuda and flex_attention is not None):
            raise ValueError(f"attn_backend 'flex' needs CUDA and flex_attention (device={device.type})")
        return "flex"
    if requested != "auto":
        raise ValueError(f"unknown attn_backend {requested!r} (auto|sdpa|flex|varlen)")
    if on_cuda and half and _varlen_attn is not None:
        return "varlen"
    if on_cuda and flex_attention is not None:
        return "flex"
    return "sdpa"


def segment_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """[B, T] id of the segment each token belongs to (ids unique over the whole batch)."""
    positions = torch.arange(batch * seqlen, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True).view(batch, seqlen)


@dataclass
class AttentionContext:
    """What every layer needs to attend over this batch; built once per forward by `prepare()`."""

    backend: str
    batch: int
    seqlen: int
    device: torch.device
    cu_seqlens: torch.Tensor | None = None  # varlen: int32 on device
    max_seqlen: int = 0
    segment_ids: torch.Tensor | None = None  # sdpa/flex, [B, T]; None = one causal segment per row
    # sdpa masks / flex block masks keyed by sliding window (None = full causal), built eagerly in
    # prepare() so that layers (possibly compiled or checkpointed) only read them.
    masks: dict[int | None, object] = field(default_factory=dict)


def _sdpa_mask(ctx: AttentionContext, window: int | None) -> torch.Tensor | None:
    if ctx.segment_ids is None and window is None:
        return None  # plain causal: SDPA's is_causal keeps its fast kernels
    idx = torch.arange(ctx.seqlen, device=ctx.device)
    mask = idx[None, :] <= idx[:, None]  # [T, T] causal
    if window is not None:
        mask = mask & (idx[:, None] - idx[None, :] < window)
    mask = mask.unsqueeze(0)
    if ctx.segment_ids is not None:
        seg = ctx.segment_ids
        mask = mask & (seg[:, :, None] == seg[:, None, :])
    return mask.unsqueeze(1)  # [B or 1, 1, T, T]


def _flex_block_mask(ctx: AttentionContext, window: int | None):
    seg = ctx.segment_ids

    def mask_mod(b, h, q_idx, kv_idx):
        keep = kv_idx <= q_idx
        if seg is not None:
            keep = keep & (seg[b, q_idx] == seg[b, kv_idx])
        if window is not None:
            keep = keep & (q_idx - kv_idx < window)
        return keep

    return create_block_mask(mask_mod, ctx.batch, None, ctx.seqlen, ctx.seqlen, device=ctx.device)


def prepare(
    backend: str,
    batch: int,
    seqlen: int,
    device: torch.device,
    dtype: torch.dtype,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    windows: Iterable[int | None] = (None,),
) -> AttentionContext:
    """Resolve the backend and precompute the document structure for one forward pass.

    `windows` lists the sliding windows the layers use (None = full causal), so masks are built once each.
    """
    name = resolve_backend(backend, device, dtype)
    ctx = AttentionContext(backend=name, batch=batch, seqlen=seqlen, device=device)
    if cu_seqlens is not None:
        if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
        cu_seqlens = cu_seqlens.to(device=device)
    if name == "varlen":
        if cu_seqlens is None:
            cu_seqlens = torch.arange(0, (batch + 1) * seqlen, seqlen, device=device)
            max_seqlen = seqlen
        elif max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # host sync; pass it to avoid
        ctx.cu_seqlens = cu_seqlens.to(torch.int32)
        ctx.max_seqlen = int(max_seqlen)
        return ctx
    if cu_seqlens is not None:
        ctx.segment_ids = segment_ids_from_cu_seqlens(cu_seqlens.to(torch.int64), batch, seqlen)
    build = _flex_block_mask if name == "flex" else _sdpa_mask
    for w in dict.fromkeys(windows):
        ctx.masks[w] = build(ctx, w)
    return ctx


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext, window: int | None = None
) -> torch.Tensor:
    """Causal attention inside segments. q: [B, T, H, D]; k, v: [B, T, Hkv, D] -> [B, T, H, D]."""
    b, t, h, d = q.shape
    gqa = k.shape[2] != h
    if ctx.backend in ("varlen", "flex") and torch.is_autocast_enabled(q.device.type):
        # These kernels are not autocast-aware, and an fp32 norm weight (Qwen3's q/k norm) promotes q/k to fp32.
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if ctx.backend == "varlen":
        flat = [x.reshape(b * t, x.shape[2], d) for x in (q, k, v)]
        kwargs: dict = {}
        params = _VARLEN_PARAMS
        if "window_size" in params:
            kwargs["window_size"] = (window - 1 if window is not None else -1, 0)
        else:  # torch 2.9/2.10 spelling
            if window is not None:
                raise ValueError("sliding-window attention with varlen needs a newer torch (window_size)")
            kwargs["is_causal"] = True
        if gqa:
            if "enable_gqa" in params:
                kwargs["enable_gqa"] = True
            else:
                rep = h // k.shape[2]
                flat[1] = flat[1].repeat_interleave(rep, dim=1)
                flat[2] = flat[2].repeat_interleave(rep, dim=1)
        out = _varlen_attn(*flat, ctx.cu_seqlens, ctx.cu_seqlens, ctx.max_seqlen, ctx.max_seqlen, **kwargs)
        return out.view(b, t, h, d)

    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    if ctx.backend == "flex":
        out = _flex()(qt, kt, vt, block_mask=ctx.masks[window], enable_gqa=gqa)
    else:
        mask = ctx.masks[window]
        if mask is None:
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2)
