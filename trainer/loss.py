"""Summed token cross-entropy over pre-shifted labels, with or without the full logits tensor.

Labels in packed rows are already shifted (labels[i] is what position i must predict), so there is no
shift here. The sum, not the mean, is returned: the loop divides by the trainable tokens of the whole
global batch, which makes gradient accumulation and world size leave the update unchanged.

Two ways to get there from the final hidden states (`head_loss`):

- `full`: logits for every position ([tokens x vocab], fp32 for the softmax), then cross-entropy. With a
  150k vocabulary the logits, their log-softmax and their gradient dominate a step's memory.
- `chunked` (default): only positions whose label is not -100 reach the LM head, `chunk_tokens` at a time.
  For a plain bias-free `nn.Linear` head (the usual case, tied or not) one autograd node computes each chunk's
  loss and its gradients with respect to the hidden states and the head weight in the forward pass and
  frees the chunk's logits at once, so the backward only scales the stored gradients: the head's matmuls are
  done three times per chunk, as the full path does, and the peak is one chunk of logits instead of all of them.
  Any other head (a LoRA-wrapped or biased one) goes through `torch.utils.checkpoint` per chunk instead:
  same memory bound, one extra forward matmul per chunk in backward.

Both must give the same loss and gradients (tests compare them with each other and with transformers).
The chunked path is computed inside the model's forward so that, under FSDP2, the head weight it reads is
the unsharded parameter of the root module and its gradient reaches FSDP's reduce-scatter as usual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from formats.schema import IGNORE_INDEX

LossImpl = Literal["chunked", "full"]
DEFAULT_CHUNK_TOKENS = 1024


@dataclass
class LossConfig:
    """How the model turns hidden states into the summed loss (set by the trainer from `model.loss*` keys)."""

    impl: LossImpl = "chunked"
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    # Gemma 2-style `cap * tanh(logits / cap)` before the softmax; None = plain logits.
    softcap: float | None = None
    # Multiplier of the logits (Cohere's logit_scale, 1 / Granite's logits_scaling); 1.0 = none.
    logit_scale: float = 1.0


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of -log p(label) over positions whose label is not -100, computed in fp32 (fp64 stays fp64)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).to(torch.promote_types(logits.dtype, torch.float32)),
        labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum",
    )


def _postprocess(logits: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    if cfg.logit_scale != 1.0:
        logits = logits * cfg.logit_scale
    if cfg.softcap is not None:
        logits = torch.tanh(logits / cfg.softcap) * cfg.softcap
    return logits


def head_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, cfg: LossConfig | None = None) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` against pre-shifted `labels` ([..., H] and [...]).

    Returns an fp32 scalar; 0 (still connected to the graph) when no position is trained.
    """
    cfg = cfg or LossConfig()
    if cfg.impl == "full":
        return summed_cross_entropy(_postprocess(head(hidden), cfg), labels)
    if cfg.impl != "chunked":
        raise ValueError(f"loss implementation must be 'chunked' or 'full', got {cfg.impl!r}")
    if cfg.chunk_tokens < 1:
        raise ValueError(f"loss chunk_tokens must be >= 1, got {cfg.chunk_tokens}")
    flat_labels = labels.reshape(-1)
    keep = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)  # one host sync: the trained-token count
    h = hidden.reshape(-1, hidden.size(-1)).index_select(0, keep)
    y = flat_labels.index_select(0, keep)
    if type(head) is nn.Linear and head.bias is None:
        dtype = _compute_dtype(h, head.weight)
        return _ChunkedLinearCE.apply(h, head.weight, y, cfg.chunk_tokens, cfg.softcap, cfg.logit_scale, dtype,
                                      torch.is_grad_enabled())
    return _checkpointed_chunks(h, head, y, cfg)


def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype the plain path would use: autocast's when active, else the weight's (as nn.Linear)."""
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return torch.promote_types(h.dtype, weight.dtype)


def _checkpointed_chunks(h: torch.Tensor, head: nn.Module, y: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    def chunk_loss(hc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
        return summed_cross_entropy(_postprocess(head(hc), cfg), yc)

    total = h.new_zeros((), dtype=torch.promote_types(h.dtype, torch.float32))
    grad = torch.is_grad_enabled()
    for start in range(0, h.size(0), cfg.chunk_tokens):
        hc, yc = h[start:start + cfg.chunk_tokens], y[start:start + cfg.chunk_tokens]
        if grad:
            total = total + checkpoint(chunk_loss, hc, yc, use_reentrant=False)
        else:
            total = total + chunk_loss(hc, yc)
    if h.size(0) == 0:
        total = total + h.sum() * 0  # keep the graph connected so backward() still works
    return total


class _ChunkedLinearCE(torch.autograd.Function):
    """sum_i CE(post(h_i W^T), y_i), with d/dh and d/dW computed chunk by chunk in the forward pass."""

    @staticmethod
    def forward(ctx, h, weight, y, chunk_tokens, softcap, logit_scale, dtype, grad_enabled):  # noqa: D102
        # Grad mode is off inside forward(); the caller says whether a backward can follow.
        need_h, need_w = grad_enabled and h.requires_grad, grad_enabled and weight.requires_grad
        need_grad = need_h or need_w
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dtype)
            acc = torch.promote_types(dtype, torch.float32)  # softmax and sums in fp32 (or fp64 if given it)
            grad_h = torch.empty_like(h) if need_grad and need_h else None
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_grad and need_w else None
            total = torch.zeros((), dtype=acc, device=h.device)
            for start in range(0, h.size(0), chunk_tokens):
                hc = h[start:start + chunk_tokens].to(dtype)
                yc = y[start:start + chunk_tokens]
                logits = (hc @ w.t()).to(acc)
                if logit_scale != 1.0:
                    logits.mul_(logit_scale)
                capped = None
                if softcap is not None:
                    capped = torch.tanh(logits / softcap)
                    logits = capped * softcap
                # log-sum-exp in place over the logits buffer: no second [chunk x vocab] temporary.
                target = logits.gather(1, yc[:, None]).squeeze(1)
                peak = logits.amax(dim=-1, keepdim=True)
                probs = logits.sub_(peak).exp_()
                norm = probs.sum(dim=-1, keepdim=True)
                total += (norm.log() + peak - target[:, None]).sum()
                if not need_grad:
                    del logits, probs, capped
                    continue
                # d CE / d logits = softmax - onehot, still in the same buffer.
                g = probs.div_(norm)
                g[torch.arange(g.size(0), device=g.device), yc] -= 1.0
                if capped is not None:
                    g.mul_(1.0 - capped * capped)
                if logit_scale != 1.0:
                    g.mul_(logit_scale)
                g = g.to(dtype)
                if grad_h is not None:
                    grad_h[start:start + chunk_tokens] = (g @ w).to(h.dtype)
                if grad_w is not None:
                    grad_w += (g.t() @ hc).to(acc)
                del logits, probs, g, capped  # free this chunk before the next one is allocated
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.has = (grad_h is not None, grad_w is not None)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        saved = list(ctx.saved_tensors)
        grad_h = grad_w = None
        if ctx.has[0]:
            stored = saved.pop(0)
            grad_h = (stored * grad_out).to(stored.dtype)
        if ctx.has[1]:
            grad_w = (saved.pop(0) * grad_out).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None, None
