"""The CPU sdpa path attends per segment (one causal call each); it must equal the block-diagonal masked path,
values and gradients, and fall back to the mask whenever per-segment slicing would change the semantics."""

from __future__ import annotations

import dataclasses

import torch

from trainer import attention


def _qkv(b: int, t: int, h: int, hkv: int, d: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, t, n, d, generator=g, requires_grad=True) for n in (h, hkv, hkv)]


def _run(ctx: attention.AttentionContext, tensors: list[torch.Tensor], window: int | None = None):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in tensors)
    out = attention.attend(q, k, v, ctx, window)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * weights).sum().backward()
    return out.detach(), [x.grad for x in (q, k, v)]


def test_per_segment_equals_masked_path_values_and_grads():
    b, t = 3, 16
    # row 0: docs 5, 7 + tail 4; row 1: one doc filling the row; row 2: docs 1, 3, 2 + tail 10
    cu = torch.tensor([0, 5, 12, 16, 32, 33, 36, 38, 48], dtype=torch.int32)
    ctx = attention.prepare("sdpa", b, t, torch.device("cpu"), torch.float32, cu_seqlens=cu)
    assert ctx.segments == [(0, 5), (5, 12), (12, 16), (16, 32), (32, 33), (33, 36), (36, 38), (38, 48)]
    masked = dataclasses.replace(ctx, segments=None)
    assert masked.masks[None] is not None  # still built: compiled blocks take the masked path
    tensors = _qkv(b, t, h=4, hkv=2, d=8)  # GQA
    out_seg, grads_seg = _run(ctx, tensors)
    out_mask, grads_mask = _run(masked, tensors)
    torch.testing.assert_close(out_seg, out_mask, atol=1e-5, rtol=1e-5)
    for gs, gm in zip(grads_seg, grads_mask, strict=True):
        torch.testing.assert_close(gs, gm, atol=1e-5, rtol=1e-5)


def test_segment_crossing_a_row_boundary_keeps_the_mask():
    # One segment spans the end of row 0 and the start of row 1: the mask (per row) keeps rows apart, a
    # per-segment call over the flattened tokens would not, so the per-segment path must not be taken.
    cu = torch.tensor([0, 3, 6, 8], dtype=torch.int32)
    ctx = attention.prepare("sdpa", 2, 4, torch.device("cpu"), torch.float32, cu_seqlens=cu)
    assert ctx.segments is None
    assert ctx.masks[None].shape == (2, 1, 4, 4)


def test_sliding_window_layers_use_the_mask():
    cu = torch.tensor([0, 10, 16], dtype=torch.int32)
    ctx = attention.prepare("sdpa", 1, 16, torch.device("cpu"), torch.float32, cu_seqlens=cu, windows=(None, 4))
    assert ctx.segments is not None and 4 in ctx.masks
    tensors = _qkv(1, 16, h=2, hkv=2, d=4, seed=1)
    out_win, _ = _run(ctx, tensors, window=4)
    out_ref, _ = _run(dataclasses.replace(ctx, segments=None), tensors, window=4)
    torch.testing.assert_close(out_win, out_ref)
    # and the window really changes the result against full causal attention in the 10-token document
    out_full, _ = _run(ctx, tensors, window=None)
    assert not torch.allclose(out_win[:, 4:10], out_full[:, 4:10])
