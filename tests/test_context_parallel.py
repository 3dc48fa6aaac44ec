"""Context parallelism (parallel.cp): rows split along the sequence over cp ranks, keys/values all-gathered.

References: the slice masks must equal the matching rows of the whole-row mask `trainer.attention` builds for
one process (itself checked against transformers by the parity tests); the 2-rank gloo runs must reproduce
the one-process run of the same config (loss curve, exported weights, resume from a cp=2 checkpoint on one
process). fp32 on CPU: the difference is rounding only (rel 2e-5 on losses, 1e-4 on weights after Adam).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from formats.reader import open_dataset
from tests.helpers.dist_run import run_trainer
from tests.helpers.tiny_run import logged_losses, make_tokenizer_and_model, pack_rows
from trainer import attention
from trainer.config import ConfigError, ParallelSection, load_config
from trainer.context_parallel import (
    ContextParallel,
    ContextParallelError,
    check_sequence,
    local_slice,
    prepare_attention,
)
from trainer.distributed import MeshError, MeshShape, resolve_mesh_shape

# ---------------------------------------------------------------------------------- config and mesh


def test_cp_mesh_on_cpu_flattens_with_dp_shard() -> None:
    shape = resolve_mesh_shape(ParallelSection(cp=2), 2, "cpu")
    assert shape == MeshShape(dp_replicate=1, dp_shard=1, cp=2, tp=1)
    assert shape.dp == 1 and shape.world_size == 2
    assert shape.dims() == [("dp_shard", 1), ("cp", 2)]  # dp_shard kept (size 1) for the dp_shard x cp flatten
    assert resolve_mesh_shape(ParallelSection(cp=2), 8, "cpu").dims() == [("dp_shard", 4), ("cp", 2)]
    assert resolve_mesh_shape(ParallelSection(cp=2, dp_replicate=2), 4, "cuda").dims() == [
        ("dp_replicate", 2), ("dp_shard", 1), ("cp", 2)]


def test_cp_mesh_refusals() -> None:
    with pytest.raises(MeshError, match=r"parallel\.cp = 2 with parallel\.tp = 2: context parallelism is not "
                                        r"implemented together with tensor parallelism"):
        resolve_mesh_shape(ParallelSection(cp=2, tp=2), 4, "cpu")
    with pytest.raises(MeshError, match=r"world size 3 is not divisible by .*parallel\.cp \(2\) = 2"):
        resolve_mesh_shape(ParallelSection(cp=2), 3, "cpu")
    with pytest.raises(MeshError, match=r"= 2, but the world size is 1"):
        resolve_mesh_shape(ParallelSection(cp=2, dp_shard=1), 1, "cpu")


@pytest.mark.parametrize(("extra", "named"), [
    (["parallel.tp=2"], r"parallel\.tp = 2 \(not implemented together\)"),
    (["model.backend=hf"], "model.backend hf"),
    (["model.attn_backend=flex"], "model.attn_backend flex"),
    (["model.attn_backend=varlen"], "model.attn_backend varlen"),
    (["peft.pet_type=loreft"], "peft.pet_type loreft"),
    (["peft.pet_type=prefix_tuning"], "peft.pet_type prefix_tuning"),
    (["peft.neftune_noise_alpha=5"], "peft.neftune_noise_alpha"),
])
def test_config_refuses_what_context_parallelism_does_not_split(extra, named) -> None:
    with pytest.raises(ConfigError, match=rf"parallel\.cp = 2 cannot be combined with {named}"):
        load_config(None, ["parallel.context_parallel=2", *extra])
    load_config(None, extra)  # fine without cp
    # What it does split: LoRA, sdpa / auto attention.
    assert load_config(None, ["parallel.cp=2", "peft.pet_type=lora", "model.attn_backend=sdpa"]).parallel.cp == 2


def test_seq_length_must_divide_by_cp() -> None:
    check_sequence(96, 2)
    with pytest.raises(ContextParallelError, match=r"parallel\.cp = 4 .*seq_length = 94 .*--seq-length 96"):
        check_sequence(94, 4)
    batch = {k: torch.zeros(1, 95, dtype=torch.long) for k in ("input_ids", "labels", "position_ids")}
    with pytest.raises(ContextParallelError, match=r"seq_length = 95"):
        local_slice(batch, ContextParallel(None, 0, 2))


# ------------------------------------------------------------------------------------------- masks


def _cu(lengths: list[list[int]]) -> torch.Tensor:
    flat = [n for row in lengths for n in row]
    return torch.tensor(np.concatenate([[0], np.cumsum(flat)]), dtype=torch.int32)


@pytest.mark.parametrize(("cp_size", "balanced"), [(2, False), (4, False), (2, True), (3, True)])
def test_slice_masks_are_rows_of_the_whole_row_mask(cp_size, balanced) -> None:
    """Documents straddling the split: a query sees the keys before its slice that share its document, nothing
    of the next one, nothing ahead; sliding windows count row positions. Load balanced: rank r holds chunks r and
    2cp-1-r, and the gathered keys come rank after rank."""
    t = 24
    docs = [[5, 9, 7, 3], [13, 11]]  # boundaries at 5, 14, 21 and 13: inside slices for cp 2 and 4
    cu = _cu(docs)
    whole = attention.prepare("sdpa", 2, t, torch.device("cpu"), torch.float32, cu_seqlens=cu, windows=(None, 4))
    local = t // cp_size
    held = [ContextParallel(None, r, cp_size, load_balance=balanced).indices(local) for r in range(cp_size)]
    assert sorted(torch.cat(held).tolist()) == list(range(t))  # every position on exactly one rank
    if balanced:
        c = t // (2 * cp_size)
        assert held[0].tolist() == [*range(c), *range(t - c, t)]
    for rank in range(cp_size):
        cp = ContextParallel(None, rank, cp_size, load_balance=balanced)
        ctx = prepare_attention(cp, "auto", 2, local, torch.device("cpu"), cu, windows=(None, 4))
        assert ctx.backend == "sdpa" and ctx.segments is None and ctx.ring is None
        for w in (None, 4):
            expected = whole.masks[w][:, :, held[rank], :][..., torch.cat(held)]
            assert ctx.masks[w].shape == (2, 1, local, t)
            assert torch.equal(ctx.masks[w], expected), (rank, w)
    with pytest.raises(ContextParallelError, match=r"model\.attn_backend 'flex' is not implemented with "
                                                   r"parallel\.cp > 1"):
        prepare_attention(ContextParallel(None, 0, 2), "flex", 2, 12, torch.device("cpu"), cu)


@pytest.mark.parametrize("cu", [None, _cu([[5, 9, 7, 3], [13, 11]])])
def test_ring_blocks_cover_the_whole_row_mask_and_balance_the_work(cu) -> None:
    """The ring's step s holds rank (r - s) mod cp's keys: its block masks, put at those keys' positions, are
    the rows of the whole-row mask; a block the mask hides entirely is skipped (None). Causal work per rank
    (visible query-key pairs) is equal under load balancing, and grows with the rank without it."""
    t, cp_size = 32, 4
    whole = attention.prepare("sdpa", 2, t, torch.device("cpu"), torch.float32, cu_seqlens=cu, windows=(None, 4))
    for balanced in (False, True):
        work = []
        for rank in range(cp_size):
            cp = ContextParallel(None, rank, cp_size, "ring", balanced)
            ctx = prepare_attention(cp, "sdpa", 2, t // cp_size, torch.device("cpu"), cu, windows=(None, 4))
            plan = ctx.ring
            assert plan is not None and not ctx.masks
            for w in (None, 4):
                got = torch.zeros(2, t // cp_size, t, dtype=torch.bool)
                for s, mask in enumerate(plan.masks(w)):
                    cols = plan.k_idx[(rank - s) % cp_size]
                    if mask is None:
                        assert not bool(whole_rows(whole, w, plan.q_idx)[..., cols].any())
                        continue
                    got[:, :, cols] = mask.expand(2, -1, -1)
                assert torch.equal(got, whole_rows(whole, w, plan.q_idx)), (balanced, rank, w)
            work.append(sum(int(m.sum()) for m in plan.masks(None) if m is not None))
        if cu is None:
            assert (len(set(work)) == 1) == balanced, (balanced, work)
            if not balanced:
                assert work == sorted(work) and sum(
                    m is None for m in prepare_attention(ContextParallel(None, 0, cp_size, "ring"), "sdpa", 2,
                                                         t // cp_size, torch.device("cpu"), None).ring.masks(None)
                ) == cp_size - 1  # rank 0 holds the first keys: it skips every other rank's block


def whole_rows(whole: attention.AttentionContext, window: int | None, rows: torch.Tensor) -> torch.Tensor:
    """[2, len(rows), T] of the one-process mask (None: plain causal)."""
    mask = whole.masks[window]
    if mask is None:
        t = whole.seqlen
        mask = torch.ones(t, t, dtype=torch.bool).tril().expand(2, 1, t, t)
    return mask.expand(2, -1, -1, -1)[:, 0, rows, :]


@pytest.mark.parametrize(("kernel", "device", "chunk"), [
    ("flash_cpu", "cpu", None), ("math", "cpu", None), ("math", "cpu", 4),
    pytest.param("math", "cuda", 4, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
def test_ring_blocks_combine_to_whole_attention_and_its_gradients(kernel, device, chunk) -> None:
    """The ring's two block kernels on their own: the keys cut into blocks, each block's output and log-sum-exp
    combined, equal sdpa over all keys (grouped-query heads, a per-document causal mask leaving some rows of a
    block empty); each block's backward from the final output and log-sum-exp sums to autograd's gradients.
    `chunk`: the math kernel takes that many queries at a time (6 queries: chunks of 4 and 2)."""
    from unittest import mock

    from trainer.context_parallel import math_query_chunk

    b, h, g, tq, d = 2, 4, 2, 6, 8
    if chunk is not None:
        with mock.patch("trainer.context_parallel.MATH_CHUNK_BYTES", chunk * b * h * tq * 4):
            assert math_query_chunk(b, h, tq) == chunk
            _check_ring_blocks(kernel, device, b, h, g, tq, d)
    else:
        _check_ring_blocks(kernel, device, b, h, g, tq, d)


def _check_ring_blocks(kernel: str, device: str, b: int, h: int, g: int, tq: int, d: int) -> None:
    from trainer.context_parallel import _block_backward, _block_forward, _combine

    torch.manual_seed(0)
    q = torch.randn(b, h, tq, d, device=device, requires_grad=True)
    k, v = (torch.randn(b, g, 3 * tq, d, device=device, requires_grad=True) for _ in range(2))
    seg = torch.tensor([[0] * 9 + [1] * 9, [0] * 13 + [1] * 5], device=device)
    q_idx = torch.arange(2 * tq, 3 * tq, device=device)  # the queries are the last 6 positions
    k_idx = torch.arange(3 * tq, device=device)
    mask = (k_idx[None, None, :] <= q_idx[None, :, None]) & (seg[:, q_idx, None] == seg[:, None, k_idx])
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1), enable_gqa=True)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)

    scale = d ** -0.5
    blocks = [slice(0, tq), slice(tq, 2 * tq), slice(2 * tq, 3 * tq)]
    with torch.no_grad():
        out = torch.zeros(b, h, tq, d, device=device)
        lse = torch.full((b, h, tq), float("-inf"), device=device)
        for blk in blocks:
            m = mask[:, :, blk]
            assert (~m.any(-1)).any() or blk.start == 2 * tq  # rows that see none of the block's keys
            out, lse = _combine(out, lse, *_block_forward(kernel, q, k[:, :, blk].contiguous(),
                                                          v[:, :, blk].contiguous(), m, scale))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        dq = torch.zeros_like(q)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        for blk in blocks:
            bq, bk, bv = _block_backward(kernel, grad, q, k[:, :, blk].contiguous(), v[:, :, blk].contiguous(),
                                         out, lse, mask[:, :, blk], scale)
            dq += bq
            dk[:, :, blk], dv[:, :, blk] = bk, bv
    for got, want in zip((dq, dk, dv), ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_load_balance_resolution_and_its_divisibility() -> None:
    from trainer.context_parallel import cp_load_balance

    assert cp_load_balance(load_config(None, ["parallel.cp=2", "parallel.cp_attention=ring"]).parallel)
    assert not cp_load_balance(load_config(None, ["parallel.cp=2"]).parallel)
    assert not cp_load_balance(load_config(None, ["parallel.cp_attention=ring",
                                                  "parallel.cp_load_balance=false"]).parallel)
    assert cp_load_balance(load_config(None, ["parallel.cp_load_balance=true"]).parallel)
    check_sequence(96, 4, load_balance=True)
    with pytest.raises(ContextParallelError, match=r"2 x 4 chunks .*divisible by 8: re-pack with --seq-length 104"
                                                   r".*cp_load_balance: false"):
        check_sequence(100, 4, load_balance=True)
    with pytest.raises(ConfigError, match=r"parallel\.cp_attention: 'ulysses' is not one of allgather, ring"):
        load_config(None, ["parallel.cp_attention=ulysses"])


def test_local_slice_keeps_global_positions_and_whole_row_counts() -> None:
    ids = torch.arange(16).view(2, 8)
    batch = {"input_ids": ids, "labels": ids + 100, "position_ids": ids % 5, "cu_seqlens": _cu([[5, 3], [8]]),
             "num_trainable": 11, "max_seqlen": 8, "doc_len_sq_sum": 98}
    out = local_slice(batch, ContextParallel(None, 1, 2))
    assert torch.equal(out["input_ids"], ids[:, 4:]) and torch.equal(out["labels"], ids[:, 4:] + 100)
    assert torch.equal(out["position_ids"], (ids % 5)[:, 4:])
    assert out["cu_seqlens"] is batch["cu_seqlens"] and out["num_trainable"] == 11 and out["max_seqlen"] == 8
    assert local_slice(batch, None) is batch
    balanced = local_slice(batch, ContextParallel(None, 1, 2, load_balance=True))  # chunks 1 and 2 of 4
    assert torch.equal(balanced["input_ids"], ids[:, 2:6]) and torch.equal(balanced["labels"], ids[:, 2:6] + 100)


# ------------------------------------------------------------------------------------- multi-rank runs

gloo = pytest.mark.skipif(not dist.is_gloo_available(), reason="torch was built without gloo")


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory) -> tuple[Path, Path]:
    """The Qwen3-shaped tiny model (GQA, q/k norms, tied embeddings) and 96-token rows of several documents."""
    root = tmp_path_factory.mktemp("cp")
    model_dir = make_tokenizer_and_model(root)
    data_dir = pack_rows(model_dir, root / "data", n_records=60, seq_length=96)
    # The runs below are only a test of the split if documents cross it: count the rows where one does.
    straddling = 0
    ds = open_dataset(data_dir)
    for i in range(len(ds)):
        ends = np.cumsum(ds.row(i).doc_lengths)
        starts = ends - ds.row(i).doc_lengths
        straddling += bool(((starts < 48) & (ends > 48)).any())
    assert straddling >= len(ds) // 2, (straddling, len(ds))
    return model_dir, data_dir


def _common(model_dir: Path, data_dir: Path) -> list[str]:
    return [f"model.path={model_dir}", f"data.train=[{data_dir}]", "train.max_steps=4", "train.lr=3e-3",
            "logging.progress_bar=false", "data.micro_batch_size=1", "train.grad_accum_steps=2",
            "train.seed=3", "checkpoint.every_steps=2", "logging.plot=false", "logging.report_to=none",
            f"data.eval={data_dir}", "train.eval_every=2"]


@pytest.fixture(scope="module")
def reference_run(tiny_setup, tmp_path_factory, repo_root) -> Path:
    """One process, grad_accum 2 (global batch 2 rows): what every cp mesh below must reproduce."""
    one = tmp_path_factory.mktemp("one") / "run"
    run_trainer([*_common(*tiny_setup), f"logging.output_dir={one}"], repo_root, 1)
    return one


def _eval_losses(out_dir: Path) -> list[float]:
    import orjson

    rows = [orjson.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in rows if "eval_loss" in r]


def _assert_same_export(a_dir: Path, b_dir: Path, name: str = "model.safetensors") -> None:
    """Same tensors to rounding. The gradients agree to ~1e-6 relative (test below), but Adam divides each
    element's update by its own gradient's size, so an element whose gradient is near zero can move by up to ~lr
    differently on rounding alone. Measured (4 steps, lr 3e-3): all elements but a handful within 5e-5, the
    worst one 2e-4 off; relative norm difference <= 2.2e-4 for that tensor, <= 3e-5 for the rest."""
    from safetensors.torch import load_file

    a, b = load_file(a_dir / "export" / name), load_file(b_dir / "export" / name)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        diff = (a[key] - b[key]).abs()
        assert diff.max() < 1e-3, key
        assert diff.norm() <= 5e-4 * a[key].norm(), key
        assert (diff > 5e-5).sum() <= max(2, diff.numel() // 1000), key  # all but a few: rounding only


def _grad_norms(out_dir: Path) -> list[float]:
    import orjson

    rows = [orjson.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["grad_norm"] for r in rows if "grad_norm" in r]


@pytest.mark.dist
@pytest.mark.slow
@gloo
def test_cp2_matches_one_rank_and_resumes_on_one_rank(tiny_setup, reference_run, tmp_path, repo_root) -> None:
    common = _common(*tiny_setup)
    one, two, resumed = reference_run, tmp_path / "cp2", tmp_path / "resumed"
    run_trainer([*common, f"logging.output_dir={two}", "parallel.context_parallel=2"], repo_root, 2)
    ref, got = logged_losses(one), logged_losses(two)
    assert len(ref) == len(got) == 4
    assert got == pytest.approx(ref, rel=2e-5, abs=1e-6)
    assert len(_eval_losses(one)) == 2
    assert _eval_losses(two) == pytest.approx(_eval_losses(one), rel=2e-5)  # evaluation runs sliced too
    assert _grad_norms(two) == pytest.approx(_grad_norms(one), rel=1e-4)
    assert len(_grad_norms(one)) == 4
    assert ref[3] < ref[0]
    _assert_same_export(one, two)

    # The cp=2 checkpoint of step 2 continues on one process exactly as the uninterrupted run did.
    step2 = two / "checkpoints" / "step-00000002"
    assert step2.is_dir()
    run_trainer([*common, f"logging.output_dir={resumed}", f"checkpoint.resume={step2}"], repo_root, 1)
    cont = logged_losses(resumed)
    assert cont == pytest.approx(ref[2:], rel=2e-5, abs=1e-6)
    _assert_same_export(one, resumed)

    # And the other way: the one-process checkpoint of step 2 continues on cp=2.
    back = tmp_path / "back"
    run_trainer([*common, f"logging.output_dir={back}", "parallel.cp=2",
                 f"checkpoint.resume={one / 'checkpoints' / 'step-00000002'}"], repo_root, 2)
    assert logged_losses(back) == pytest.approx(ref[2:], rel=2e-5, abs=1e-6)
    _assert_same_export(one, back)


@pytest.mark.dist
@pytest.mark.slow
@gloo
def test_dp_shard2_x_cp2_matches_one_rank(tiny_setup, reference_run, tmp_path, repo_root) -> None:
    """4 ranks: 2 data-parallel groups read different rows, each split over 2 cp ranks; FSDP2 shards over all
    4. The token count is summed over the data-parallel ranks only, the loss over all of them."""
    out = tmp_path / "dp2cp2"
    run_trainer([*_common(*tiny_setup), f"logging.output_dir={out}", "parallel.cp=2", "parallel.dp_shard=2",
                 "train.grad_accum_steps=1", "checkpoint.every_steps=0"], repo_root, 4)
    ref, got = logged_losses(reference_run), logged_losses(out)
    assert len(got) == 4
    assert got == pytest.approx(ref, rel=2e-5, abs=1e-6)
    assert _eval_losses(out) == pytest.approx(_eval_losses(reference_run), rel=2e-5)
    _assert_same_export(reference_run, out)


@pytest.mark.dist
@pytest.mark.slow
@gloo
def test_ring_cp2_with_checkpointing_matches_one_rank(
        tiny_setup, reference_run, tmp_path, repo_root) -> None:
    """Ring attention (load balanced by default) under FSDP2 with activation checkpointing, which recomputes the
    ring in backward: the one-process run's curve, evaluation and weights."""
    common = [*_common(*tiny_setup), "parallel.cp=2", "parallel.cp_attention=ring"]
    ring = tmp_path / "ring"
    run_trainer([*common, f"logging.output_dir={ring}", "model.activation_checkpointing=true"], repo_root, 2)
    ref = logged_losses(reference_run)
    assert logged_losses(ring) == pytest.approx(ref, rel=2e-5, abs=1e-6)
    assert _eval_losses(ring) == pytest.approx(_eval_losses(reference_run), rel=2e-5)
    _assert_same_export(reference_run, ring)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="NCCL context parallelism needs 2 CUDA devices")
@pytest.mark.parametrize("mode", ["allgather", "ring"])
def test_cp2_on_nccl_matches_one_gpu(tiny_setup, tmp_path, repo_root, mode) -> None:
    """On GPUs the ring's blocks take the explicit-math kernel; fp32, so the difference is rounding."""
    common = [*_common(*tiny_setup), "model.dtype=fp32", "checkpoint.every_steps=0"]
    one, two = tmp_path / "one", tmp_path / "cp2"
    run_trainer([*common, f"logging.output_dir={one}"], repo_root, 1)
    run_trainer([*common, f"logging.output_dir={two}", "parallel.cp=2", f"parallel.cp_attention={mode}",
                 "parallel.backend=nccl"], repo_root, 2)
    assert logged_losses(two) == pytest.approx(logged_losses(one), rel=1e-4, abs=1e-5)
    assert _eval_losses(two) == pytest.approx(_eval_losses(one), rel=1e-4)


@pytest.mark.dist
@pytest.mark.slow
@gloo
def test_lora_with_cp2_and_activation_checkpointing_matches_one_rank(tiny_setup, tmp_path, repo_root) -> None:
    """LoRA's adapters are per-token and FSDP2-sharded over the cp ranks like full weights; activation
    checkpointing recomputes the gathers in backward."""
    common = [*_common(*tiny_setup), "train.max_steps=3", "train.lr=5e-2", "peft.pet_type=lora",
              "checkpoint.every_steps=0", "model.activation_checkpointing=true", "train.eval_every=0"]
    one, two = tmp_path / "one", tmp_path / "cp2"
    run_trainer([*common, f"logging.output_dir={one}"], repo_root, 1)
    run_trainer([*common, f"logging.output_dir={two}", "parallel.cp=2"], repo_root, 2)
    ref, got = logged_losses(one), logged_losses(two)
    assert len(ref) == len(got) == 3
    assert got == pytest.approx(ref, rel=2e-5, abs=1e-6)
    assert ref[2] < ref[0]
    _assert_same_export(one, two, "adapter_model.safetensors")


# ------------------------------------------------------------------- gradients, without the optimizer


def _grad_worker(rank: int, port: int, world: int, cases: list[tuple[str, bool, str]]) -> None:
    """Every rank computes the one-process loss and gradients on the whole rows (the reference), then its cp
    slice's (summed over the ranks); Adam would magnify rounding, so the gradients themselves are compared."""
    import os
    from unittest import mock

    from trainer.model import Transformer, positions_from_cu_seqlens
    from trainer.model_config import ModelConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8, qk_norm=True,
                             sliding_windows=[None, 5, None])  # a sliding-window layer: windows in row positions
        model = Transformer(config)
        model.init_weights(torch.Generator().manual_seed(1))
        b, t = 2, 24
        cu = _cu([[5, 9, 7, 3], [13, 11]])  # both rows cross the split at 12
        ids = torch.randint(0, 64, (b, t), generator=torch.Generator().manual_seed(2))
        labels = torch.randint(0, 64, (b, t), generator=torch.Generator().manual_seed(3))
        labels[:, ::4] = -100
        pos = positions_from_cu_seqlens(cu, b, t)
        ref_loss = model(ids, pos, cu, None, labels=labels)
        ref_loss.backward()
        ref = {n: p.grad.clone() for n, p in model.named_parameters()}
        for mode, balanced, kernel in cases:
            model.zero_grad(set_to_none=True)
            cp = ContextParallel(dist.group.WORLD, rank, world, mode, balanced)
            model.context_parallel = cp
            batch = local_slice({"input_ids": ids, "labels": labels, "position_ids": pos, "cu_seqlens": cu}, cp)
            # the ring's block kernel: CPU flash attention here, the explicit math on other devices
            with mock.patch("trainer.context_parallel._ring_kernel", lambda device, k=kernel: k):
                loss = model(batch["input_ids"], batch["position_ids"], cu, None, labels=batch["labels"])
                loss.backward()
            total = loss.detach().clone()
            dist.all_reduce(total)
            torch.testing.assert_close(total, ref_loss.detach(), rtol=1e-6, atol=1e-6, msg=lambda m, n=mode: f"{n}: {m}")
            # Without position_ids the model derives the slice's positions from the whole rows.
            again = model(batch["input_ids"], None, cu, None, labels=batch["labels"])
            torch.testing.assert_close(again.detach(), loss.detach(), rtol=0, atol=0)
            for name, param in model.named_parameters():
                label = f"{mode} balanced={balanced} {kernel} {name}"
                grad = param.grad.clone()
                dist.all_reduce(grad)  # what FSDP2's reduce-scatter over the cp ranks adds up in a run
                # fp32 rounding of sums taken in another order (two partial sums added): relative to the tensor.
                scale = float(ref[name].abs().max())
                assert float((grad - ref[name]).norm()) <= 1e-5 * float(ref[name].norm()), label
                torch.testing.assert_close(grad, ref[name], rtol=0, atol=1e-5 * scale,
                                           msg=lambda m, n=label: f"{n}: {m}")
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
@gloo
@pytest.mark.parametrize("world", [2, 4])
def test_cp_loss_and_gradients_equal_the_whole_rows(world) -> None:
    """allgather and ring, each with and without load balancing, and the ring's math block kernel; the ring with
    4 ranks too, whose balanced chunks are 3 positions long, so most ring blocks are partly masked and some
    skipped (and some rows of a block see none of its keys)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    modes = ("allgather", "ring") if world == 2 else ("ring",)
    cases = [(mode, balanced, "flash_cpu") for mode in modes for balanced in (False, True)] + [("ring", True, "math")]
    mp.spawn(_grad_worker, args=(port, world, cases), nprocs=world, join=True)
