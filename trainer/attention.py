"""Causal attention over packed rows, with no attention across documents.

A packed batch carries `cu_seqlens` (segment boundaries over the flattened B*T tokens). Three backends turn
that into "attend only inside your own segment, causally":

- `sdpa`:   `F.scaled_dot_product_attention`. On CPU (the CPU path), one causal call per segment: a row of
            documents of lengths L_i costs sum(L_i^2)/2 instead of the full T^2 a masked call computes (several
            times less on 1024-token rows of ~225-token Alpaca documents). Elsewhere, or for
            sliding-window layers, or inside torch.compile, a block-diagonal causal boolean mask (O(T^2) memory).
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
    # prepare() so that layers (possibly compiled or checkpointed) only read them. They are built even when
    # `segments` is set: a compiled block takes the mask path, and a mask costs ~1 ms per forward on CPU.
    masks: dict[int | None, object] = field(default_factory=dict)
    # sdpa on CPU: (start, end) of every segment over the flattened B*T tokens, none crossing a row boundary.
    segments: list[tuple[int, int]] | None = None
    # Prefix tuning (trainer.prefix): this many learned key/value slots come before every row's keys, visible to
    # every query; the sdpa masks then have prefix_len + T columns.
    prefix_len: int = 0
    # Context parallelism (trainer.context_parallel.prepare_attention): this rank holds T/cp queries of each row.
    # allgather: it gathers every layer's keys/values over the cp group, and `masks` are [B, 1, T/cp, T];
    # ring: `ring` (a RingPlan) attends instead, passing the keys/values around the cp ranks.
    cp: object | None = None
    ring: object | None = None


def _row_local_segments(cu_seqlens: torch.Tensor, batch: int, seqlen: int) -> list[tuple[int, int]] | None:
    """Segment bounds as host ints, or None when a segment crosses a row boundary (then only the mask,
    which works per row, gives the contract's semantics)."""
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != batch * seqlen or not set(range(0, batch * seqlen, seqlen)) <= set(bounds):
        return None
    return [(s, e) for s, e in zip(bounds[:-1], bounds[1:], strict=True) if e > s]


def _sdpa_mask(ctx: AttentionContext, window: int | None) -> torch.Tensor | None:
    if ctx.segment_ids is None and window is None and not ctx.prefix_len:
        return None  # plain causal: SDPA's is_causal keeps its fast kernels
    idx = torch.arange(ctx.seqlen, device=ctx.device)
    mask = idx[None, :] <= idx[:, None]  # [T, T] causal
    if window is not None:
        mask = mask & (idx[:, None] - idx[None, :] < window)
    mask = mask.unsqueeze(0)
    if ctx.segment_ids is not None:
        seg = ctx.segment_ids
        mask = mask & (seg[:, :, None] == seg[:, None, :])
    if ctx.prefix_len:
        mask = torch.cat([mask.new_ones(mask.shape[0], mask.shape[1], ctx.prefix_len), mask], -1)
    return mask.unsqueeze(1)  # [B or 1, 1, T, prefix_len + T]


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
    prefix_len: int = 0,
) -> AttentionContext:
    """Resolve the backend and precompute the document structure for one forward pass.

    `windows` lists the sliding windows the layers use (None = full causal), so masks are built once each.
    `prefix_len` > 0: every layer attends to that many prefix slots first (prefix tuning); only sdpa takes them
    (`auto` then means sdpa), since the varlen and flex calls here are built for equal query and key lengths.
    """
    if prefix_len:
        if backend not in ("auto", "sdpa"):
            raise ValueError(f"attn_backend {backend!r} cannot attend to prefix-tuning prefixes (peft.pet_type "
                             "prefix_tuning); set model.attn_backend: sdpa (or auto)")
        if any(w is not None for w in windows):
            raise ValueError("prefix tuning is not implemented for sliding-window attention layers")
        backend = "sdpa"
    name = resolve_backend(backend, device, dtype)
    ctx = AttentionContext(backend=name, batch=batch, seqlen=seqlen, device=device, prefix_len=prefix_len)
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
    if name == "sdpa" and cu_seqlens is not None and device.type == "cpu" and not torch.compiler.is_compiling():
        ctx.segments = _row_local_segments(cu_seqlens, batch, seqlen)  # on CPU: no device sync
    for w in dict.fromkeys(windows):
        ctx.masks[w] = build(ctx, w)
    return ctx


def _attend_segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: list[tuple[int, int]]) -> torch.Tensor:
    """One causal SDPA call per segment of the flattened tokens; q: [N, H, D], k/v: [N, Hkv, D] -> [N, H, D]."""
    gqa = k.shape[1] != q.shape[1]
    outs = []
    for s, e in segments:
        qs, ks, vs = (x[s:e].transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, H, L, D]
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs, dim=0)


def _attend_prefixed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor],
                     ctx: AttentionContext) -> torch.Tensor:
    """sdpa with the prefix keys/values [P, Hkv, D] before every row's (or, on CPU, every segment's) own."""
    b, t, h, d = q.shape
    pk, pv = (x.to(k.dtype) for x in prefix)
    n_prefix = pk.shape[0]
    gqa = k.shape[2] != h
    if not torch.compiler.is_compiling() and ctx.segments is not None:
        flat = [x.reshape(b * t, x.shape[2], d) for x in (q, k, v)]
        outs = []
        for s, e in ctx.segments:  # causal inside the segment, the prefix seen by all (lower-right aligned)
            qs = flat[0][s:e].transpose(0, 1).unsqueeze(0)
            ks, vs = (torch.cat([p, x[s:e]]).transpose(0, 1).unsqueeze(0) for p, x in ((pk, flat[1]), (pv, flat[2])))
            mask = torch.ones(e - s, n_prefix + e - s, dtype=torch.bool, device=q.device).tril(n_prefix)
            out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=gqa)
            outs.append(out[0].transpose(0, 1))
        return torch.cat(outs).view(b, t, h, d)
    kt, vt = (torch.cat([p.unsqueeze(0).expand(b, -1, -1, -1), x], 1).transpose(1, 2) for p, x in ((pk, k), (pv, v)))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), kt, vt, attn_mask=ctx.masks[None], enable_gqa=gqa)
    return out.transpose(1, 2)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext, window: int | None = None,
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal attention inside segments. q: [B, T, H, D]; k, v: [B, T, Hkv, D] -> [B, T, H, D].

    `prefix` (keys, values) [P, Hkv, D]: prefix tuning's slots, attended to by every query before its segment's
    causal past (`prepare(..., prefix_len=P)` built the masks for them)."""
    if prefix is not None:
        if ctx.prefix_len != prefix[0].shape[0] or ctx.backend != "sdpa" or window is not None:
            raise ValueError(f"a {prefix[0].shape[0]}-slot prefix needs an sdpa context prepared with prefix_len="
                             f"{prefix[0].shape[0]} (got {ctx.backend}, prefix_len={ctx.prefix_len}, window={window})")
        return _attend_prefixed(q, k, v, prefix, ctx)
    if ctx.ring is not None:  # trainer.context_parallel: the other ranks' keys/values come round the ring
        return ctx.ring.attend(q, k, v, window)
    if ctx.cp is not None:  # keys/values of the whole row, this rank's queries (trainer.context_parallel)
        k, v = ctx.cp.gather(k), ctx.cp.gather(v)
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

    # is_compiling() first: a compiled block then never reads (or guards on) the host-side segment list.
    if not torch.compiler.is_compiling() and ctx.backend == "sdpa" and ctx.segments is not None and window is None:
        flat = [x.reshape(b * t, x.shape[2], d) for x in (q, k, v)]
        return _attend_segments(*flat, ctx.segments).view(b, t, h, d)
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
