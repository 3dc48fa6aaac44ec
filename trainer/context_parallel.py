"""Context parallelism for long packed rows: each cp rank keeps 1/cp of every row's positions; attention either
all-gathers the keys/values (`allgather`) or passes them around the cp ranks in a ring (`ring`).

Which positions a rank holds. The cp ranks of one data-parallel group read the same rows. Without load balancing
rank r keeps the contiguous slice [r T/cp, (r+1) T/cp). With `parallel.cp_load_balance` the row is cut into 2 cp
equal chunks and rank r keeps chunks r and 2cp-1-r (the "zigzag" layout): under causal masking the early chunks
see few keys and the late ones many, so pairing an early with a late chunk gives every rank the same share of
the attention work, which is what the ring schedule needs to skip the blocks causality masks out without one
rank waiting for another. Embeddings, norms, MLPs, the head and the loss are per-token and run on the held
positions unchanged: labels are pre-shifted and positions are the loader's `position_ids` of the whole row, taken
at the held indices (`local_slice`), so each token keeps its RoPE position.

allgather (default): every layer all-gathers K and V (after RoPE) over the cp group and attends the local
queries to the row's T keys with the per-document causal mask built from global indices: a key before the slice,
in the same document, is seen. This is the variant Llama 3's training used: with grouped-query attention K/V are a
fraction of the activations. It runs as sdpa with an explicit boolean mask [B, 1, T/cp, T] on every device and
dtype. The gather is torch's autograd-aware functional all-gather, whose backward reduce-scatters.

ring: K/V never exist whole on one rank. For cp steps each rank attends its queries to the K/V block it holds,
then sends that block to the next rank and receives the previous rank's (P2P, overlapped with the block's
compute); the blocks' partial results are combined exactly with their log-sum-exp (online softmax). The backward
pass walks the ring again: it recomputes each block's probabilities from the saved final log-sum-exp, and the
key/value gradients travel with their block, arriving back at the owner after the last step. Blocks the
per-document causal mask hides entirely are skipped. Memory per rank: K/V of T/cp positions (two blocks in
flight) instead of T, and no [T/cp, T] mask. sdpa does not return the log-sum-exp the combination needs, so the
block kernel is PyTorch's CPU flash attention op on CPU (it returns the log-sum-exp, and its backward takes the
final output and log-sum-exp), and elsewhere the explicit math in fp32, queries taken in chunks whose scores stay
under MATH_CHUNK_BYTES. PyTorch's experimental `context_parallel` (ring attention, CUDA only) shards sdpa with
plain causal masking, not the per-document masks packed rows need.

varlen / flex kernels would need the cross-rank document structure; they are refused with cp > 1
(see `prepare_attention`). The loss denominator is the whole row's trainable-token count (the loader's,
unsliced); the loss sums are added over the cp ranks. Gradients: FSDP2 shards over the flattened dp_shard x cp
mesh (`trainer.distributed`), so its reduce-scatter already sums the cp ranks' partial gradients; the loop's
scale undoes its average over dp x cp ranks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from trainer import attention

log = logging.getLogger(__name__)

SLICED_KEYS = ("input_ids", "labels", "position_ids")
CpAttention = Literal["allgather", "ring"]


class ContextParallelError(ValueError):
    """The data or the model setup does not fit parallel.cp; the message names the keys and values."""


def check_sequence(seq_length: int, cp: int, load_balance: bool = False) -> None:
    """Every row is cut into cp (2 cp with load balancing) equal chunks."""
    chunks = 2 * cp if load_balance else cp
    if seq_length % chunks:
        why = f"2 x {cp} chunks (parallel.cp_load_balance)" if load_balance else f"{cp} equal slices"
        raise ContextParallelError(
            f"parallel.cp = {cp} splits each packed row's seq_length = {seq_length} positions into {why}, which "
            f"needs seq_length divisible by {chunks}: re-pack with --seq-length "
            f"{seq_length + chunks - seq_length % chunks}, or change parallel.cp"
            + (" (or set parallel.cp_load_balance: false)" if load_balance else ""))


@dataclass(frozen=True)
class ContextParallel:
    """This rank's place in its cp group: which positions it holds and how its attention reaches the others."""

    group: Any  # torch.distributed ProcessGroup of the cp ranks
    rank: int
    size: int
    attention: CpAttention = "allgather"
    load_balance: bool = False

    def indices(self, local_len: int, rank: int | None = None, device: torch.device | None = None) -> torch.Tensor:
        """Row positions held by `rank` (this rank by default), in the order they are held."""
        r = self.rank if rank is None else rank
        if not self.load_balance:
            return torch.arange(r * local_len, (r + 1) * local_len, device=device)
        c = local_len // 2
        return torch.cat([torch.arange(r * c, (r + 1) * c, device=device),
                          torch.arange((2 * self.size - 1 - r) * c, (2 * self.size - r) * c, device=device)])

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T/cp, ...] -> [B, T, ...] in rank order (each rank's held positions in turn); autograd sends each
        slice's gradient back to its owner."""
        from torch.distributed._functional_collectives import all_gather_single_autograd

        # It gathers along dim 0: put the sequence first, and back.
        full = all_gather_single_autograd(x.movedim(1, 0).contiguous(), 0, self.group)
        return full.movedim(0, 1)


def local_slice(batch: dict[str, Any], cp: ContextParallel | None) -> dict[str, Any]:
    """This rank's positions of a device batch's per-position tensors; cu_seqlens, max_seqlen and
    num_trainable stay those of the whole rows (the attention mask and the loss denominator need them)."""
    if cp is None:
        return batch
    t = batch["input_ids"].shape[1]
    check_sequence(t, cp.size, cp.load_balance)
    n = t // cp.size
    out = dict(batch)
    if cp.load_balance:
        idx = cp.indices(n, device=batch["input_ids"].device)
        for key in SLICED_KEYS:
            out[key] = batch[key][:, idx]
    else:
        for key in SLICED_KEYS:
            out[key] = batch[key][:, cp.rank * n:(cp.rank + 1) * n]
    if "doc_len_sq_sum" in batch:  # the FLOPs count: this rank's share of the rows' attention, on average
        out["doc_len_sq_sum"] = batch["doc_len_sq_sum"] // cp.size
    return out


def _block_mask(q_idx: torch.Tensor, k_idx: torch.Tensor, seg: torch.Tensor | None,
                window: int | None) -> torch.Tensor:
    """[B or 1, Tq, Tk] bool: query at row position q_idx[i] sees key k_idx[j] (causal, same document, window)."""
    mask = k_idx[None, :] <= q_idx[:, None]
    if window is not None:
        mask = mask & (q_idx[:, None] - k_idx[None, :] < window)
    mask = mask.unsqueeze(0)
    if seg is not None:
        mask = mask & (seg[:, q_idx, None] == seg[:, None, k_idx])
    return mask


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
    """The attention context of this rank's positions, shared by every layer: for allgather the masks
    [B or 1, 1, T/cp, T] of local queries over the gathered keys; for ring the plan of the ring's blocks."""
    if backend not in ("auto", "sdpa"):
        raise ContextParallelError(f"model.attn_backend {backend!r} is not implemented with parallel.cp > 1 (the "
                                   "keys of other ranks are masked for sdpa / the ring's blocks); set "
                                   "model.attn_backend: sdpa (or auto)")
    if prefix_len:
        raise ContextParallelError("prefix tuning (peft.pet_type prefix_tuning) is not implemented with "
                                   "parallel.cp > 1")
    full = local_len * cp.size
    ctx = attention.AttentionContext(backend="sdpa", batch=batch, seqlen=local_len, device=device, cp=cp)
    seg = None
    if cu_seqlens is not None:
        seg = attention.segment_ids_from_cu_seqlens(cu_seqlens.to(device=device, dtype=torch.int64), batch, full)
    q_idx = cp.indices(local_len, device=device)
    k_blocks = [cp.indices(local_len, r, device) for r in range(cp.size)]
    if cp.attention == "ring":
        ctx.ring = RingPlan(cp, q_idx, k_blocks, seg)
        return ctx
    k_idx = torch.cat(k_blocks)  # the gathered keys, rank after rank
    for w in dict.fromkeys(windows):
        ctx.masks[w] = _block_mask(q_idx, k_idx, seg, w).unsqueeze(1)
    return ctx


def cp_load_balance(parallel: Any) -> bool:
    """`parallel.cp_load_balance` resolved: unset means on for the ring, off for allgather."""
    if parallel.cp_load_balance is None:
        return parallel.cp_attention == "ring"
    return bool(parallel.cp_load_balance)


def context_parallel_of(info: Any, attention: CpAttention = "allgather",
                        load_balance: bool = False) -> ContextParallel | None:
    """The ContextParallel of a `trainer.distributed.DistInfo`, or None when parallel.cp is 1."""
    if info.cp_mesh is None:
        return None
    return ContextParallel(info.cp_mesh.get_group(), info.cp_mesh.get_local_rank(), info.cp_mesh.size(),
                           attention, load_balance)


# ------------------------------------------------------------------------------------------ ring attention


@dataclass
class RingPlan:
    """One forward's ring: this rank's query positions, every rank's key positions and the documents."""

    cp: ContextParallel
    q_idx: torch.Tensor  # [T/cp] row positions of the local queries (and of the local keys)
    k_idx: list[torch.Tensor]  # rank r's key positions
    seg: torch.Tensor | None  # [B, T] document ids of the whole rows; None: one document per row
    _kinds: dict[int | None, list[str]] = field(default_factory=dict, repr=False)  # steps(): per window

    # Not traced by torch.compile (model.compile): the ring's P2P and its host-side skipping of empty blocks
    # run eagerly between the compiled parts of the block.
    @torch.compiler.disable
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
        """q [B, T/cp, H, D], k / v [B, T/cp, Hkv, D] (this rank's) -> [B, T/cp, H, D] over the whole rows."""
        return _RingAttention.apply(q, k, v, self, window)

    def masks(self, window: int | None) -> list[torch.Tensor | None]:
        """Per ring step s (holding rank (r - s) mod cp's block): its mask, or None when it hides every key."""
        out: list[torch.Tensor | None] = []
        for s in range(self.cp.size):
            m = self._mask(s, window)
            out.append(m if bool(m.any()) else None)
        return out

    def steps(self, window: int | None) -> list[tuple[bool, torch.Tensor | None]]:
        """Per ring step: (whether its block is computed, its mask or None when every key is visible).

        Every layer's forward and backward asks for the same steps: which blocks are empty or whole is decided
        once per window (host-side reductions), while the partial blocks' masks are rebuilt each time rather
        than kept, so the ring holds no [T/cp, T] mask."""
        kinds = self._kinds.get(window)
        if kinds is None:
            masks = self.masks(window)
            kinds = self._kinds[window] = ["skip" if m is None else "whole" if bool(m.all()) else "part"
                                           for m in masks]
            return [(k != "skip", m if k == "part" else None) for k, m in zip(kinds, masks, strict=True)]
        return [(k != "skip", self._mask(s, window) if k == "part" else None) for s, k in enumerate(kinds)]

    def _mask(self, step: int, window: int | None) -> torch.Tensor:
        return _block_mask(self.q_idx, self.k_idx[(self.cp.rank - step) % self.cp.size], self.seg, window)


class _Ring:
    """Send tensors to the next cp rank and receive the previous rank's, asynchronously."""

    def __init__(self, cp: ContextParallel) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.group = cp.group
        self.send_to = dist.get_global_rank(cp.group, (cp.rank + 1) % cp.size)
        self.recv_from = dist.get_global_rank(cp.group, (cp.rank - 1) % cp.size)

    def start(self, tensors: list[torch.Tensor]) -> tuple[list[Any], list[torch.Tensor]]:
        dist = self.dist
        bufs = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.send_to, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, b, self.recv_from, self.group) for b in bufs]
        return dist.batch_isend_irecv(ops), bufs

    @staticmethod
    def finish(pending: tuple[list[Any], list[torch.Tensor]]) -> list[torch.Tensor]:
        reqs, bufs = pending
        for req in reqs:
            req.wait()
        return bufs


def _heads(x: torch.Tensor, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """[B, T, heads, D] -> [B, heads, T, D], contiguous: the blocks' layout; fp32 is what they compute and
    combine in (dtype None keeps x's: the K/V blocks travel round the ring in the compute dtype)."""
    return x.to(dtype or x.dtype).transpose(1, 2).contiguous()


def _ring_kernel(device: torch.device) -> Literal["flash_cpu", "math"]:
    """The block kernel: PyTorch's CPU flash attention, which returns the log-sum-exp and has a backward that
    takes the final output and log-sum-exp (what the ring needs), or the explicit math elsewhere."""
    return "flash_cpu" if device.type == "cpu" else "math"


def _bias(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The additive form of a block mask, [B or 1, 1, Tq, Tk] (the CPU flash kernel takes no boolean mask)."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf")).unsqueeze(1)


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, H, T, D]: query head h reads kv head h // (H / Hkv), as sdpa's GQA does."""
    b, g, t, d = x.shape
    return x if g == heads else x.unsqueeze(2).expand(b, g, heads // g, t, d).reshape(b, heads, t, d)


def _group_sum(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    b, h, t, d = x.shape
    return x if h == kv_heads else x.view(b, kv_heads, h // kv_heads, t, d).sum(2)


# The math kernel's scores of one block are [B, heads, T/cp, T/cp] fp32 (16k-token blocks, 32 heads: 32 GiB): it
# takes the queries in chunks whose scores stay under this many bytes (each query's softmax is its own).
MATH_CHUNK_BYTES = 256 * 2**20


def math_query_chunk(batch: int, heads: int, keys: int) -> int:
    """Queries per chunk of the math kernel, for a block of `keys` keys."""
    return max(1, MATH_CHUNK_BYTES // (batch * heads * keys * 4))


def _block_forward(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One block: q [B, H, Tq, D], k / v [B, Hkv, Tk, D] -> (its softmax-normalised output [B, H, Tq, D], its
    log-sum-exp [B, H, Tq], -inf on rows that see no key of the block)."""
    h = q.shape[1]
    if kernel == "flash_cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, _expand_kv(k, h), _expand_kv(v, h), 0.0, False, attn_mask=_bias(mask), scale=scale)
        if mask is not None:  # it reports 0 for a row that sees nothing
            lse = lse.masked_fill(~mask.any(-1).unsqueeze(1), float("-inf"))
        return out, lse
    c = math_query_chunk(q.shape[0], h, k.shape[2])
    parts = [_math_forward(q[:, :, i:i + c], k, v, None if mask is None else mask[:, i:i + c], scale)
             for i in range(0, q.shape[2], c)]
    return torch.cat([o for o, _ in parts], 2), torch.cat([lse for _, lse in parts], 2)


def _math_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, t, d = q.shape
    g = k.shape[1]
    q = q.reshape(b, g, h // g * t, d)  # the R query heads of a group share one matmul against their kv head
    sc = (q @ k.transpose(-1, -2)).mul_(scale).view(b, g, h // g, t, -1)
    if mask is not None:
        sc.masked_fill_(~mask[:, None, None], float("-inf"))
    m = sc.amax(-1, keepdim=True)
    m = m.masked_fill(m.isneginf(), 0.0)
    p = sc.sub_(m).exp_()
    total = p.sum(-1, keepdim=True)
    out = (p.view(b, g, -1, p.shape[-1]) @ v).view(b, g, h // g, t, d) / total.clamp_min(1e-30)
    return out.view(b, h, t, d), (m + total.log()).view(b, h, t)


def _block_backward(kernel: str, grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor | None,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block's share of the gradients, from the final output and log-sum-exp of the query rows: P = exp(S -
    lse) is the block's part of the whole softmax, so the parts add up to the whole backward."""
    h, g = q.shape[1], k.shape[1]
    if kernel == "flash_cpu":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, _expand_kv(k, h), _expand_kv(v, h), out, lse, 0.0, False, attn_mask=_bias(mask),
            scale=scale)
        return dq, _group_sum(dk, g), _group_sum(dv, g)
    c = math_query_chunk(q.shape[0], h, k.shape[2])
    dqs, dk, dv = [], torch.zeros_like(k), torch.zeros_like(v)
    for i in range(0, q.shape[2], c):
        rows = slice(i, i + c)
        dq_, dk_, dv_ = _math_backward(grad_out[:, :, rows], q[:, :, rows], k, v, out[:, :, rows], lse[:, :, rows],
                                       None if mask is None else mask[:, rows], scale)
        dqs.append(dq_)
        dk.add_(dk_)
        dv.add_(dv_)
    return torch.cat(dqs, 2), dk, dv


def _math_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, mask: torch.Tensor | None,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, t, d = q.shape
    g = k.shape[1]
    r = h // g
    q, do = q.reshape(b, g, r * t, d), grad_out.reshape(b, g, r * t, d)
    sc = (q @ k.transpose(-1, -2)).mul_(scale)
    if mask is not None:
        sc.view(b, g, r, t, -1).masked_fill_(~mask[:, None, None], float("-inf"))
    p = sc.sub_(lse.reshape(b, g, r * t, 1)).exp_()  # [B, G, R Tq, Tk]
    dv = p.transpose(-1, -2) @ do
    delta = (grad_out * out).sum(-1).reshape(b, g, r * t, 1)  # rowsum(dO * O): through the final output
    ds = (do @ v.transpose(-1, -2)).sub_(delta).mul_(p)
    dq = (ds @ k).mul_(scale).view(b, h, t, d)
    dk = (ds.transpose(-1, -2) @ q).mul_(scale)
    return dq, dk, dv


def _combine(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor,
             block_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the keys seen so far and a new block's, from each part's normalised output and log-sum-exp
    (`out` is updated in place)."""
    new = torch.logaddexp(lse, block_lse)
    safe = new.masked_fill(new.isneginf(), 0.0)  # rows that have seen no key yet stay 0
    out = out.mul_(torch.exp(lse - safe).unsqueeze(-1)).add_(block_out * torch.exp(block_lse - safe).unsqueeze(-1))
    return out, new


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan,
                window: int | None) -> torch.Tensor:
        n = plan.cp.size
        scale = 1.0 / math.sqrt(q.shape[-1])
        kernel = _ring_kernel(q.device)
        qh, kv = _heads(q), [_heads(k, None), _heads(v, None)]  # [B, heads, T/cp, D]
        ring, steps = _Ring(plan.cp), plan.steps(window)
        out = torch.zeros_like(qh)
        lse = torch.full(qh.shape[:-1], float("-inf"), device=q.device)
        for s in range(n):
            pending = ring.start(kv) if s < n - 1 else None
            runs, mask = steps[s]
            if runs:
                out, lse = _combine(out, lse, *_block_forward(kernel, qh, kv[0].float(), kv[1].float(), mask, scale))
            if pending is not None:
                kv = ring.finish(pending)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.window = plan, window
        return out.transpose(1, 2).to(q.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        plan = ctx.plan
        n = plan.cp.size
        scale = 1.0 / math.sqrt(q.shape[-1])
        kernel = _ring_kernel(q.device)
        qh, do, kv = _heads(q), _heads(grad_out), [_heads(k, None), _heads(v, None)]
        dkv = [torch.zeros_like(kv[0], dtype=torch.float32), torch.zeros_like(kv[1], dtype=torch.float32)]
        ring, steps = _Ring(plan.cp), plan.steps(ctx.window)
        dq = torch.zeros_like(qh)
        for s in range(n):
            pending = ring.start(kv) if s < n - 1 else None
            runs, mask = steps[s]
            if runs:
                bq, bk, bv = _block_backward(kernel, do, qh, kv[0].float(), kv[1].float(), out, lse, mask, scale)
                dq.add_(bq)
                dkv = [dkv[0] + bk, dkv[1] + bv]
            # The block's key/value gradients go on with it; after the last step each is back at its owner.
            dkv = ring.finish(ring.start(dkv))
            if pending is not None:
                kv = ring.finish(pending)
        dk, dv = (x.transpose(1, 2).to(k.dtype) for x in dkv)
        return dq.transpose(1, 2).to(q.dtype), dk, dv, None, None
