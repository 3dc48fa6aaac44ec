"""The chunked LM-head loss against the full-logits path and transformers: loss, gradients, memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_checkpoints import save_hf_checkpoint
from torch import nn

from tests.helpers.loss_check import assert_step_loss_matches
from trainer.loss import LossConfig, head_loss, summed_cross_entropy
from trainer.weights import load_pretrained

V = 256


def _case(n=37, h=16, v=50, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, n, h, generator=g, dtype=dtype, requires_grad=True)
    head = nn.Linear(h, v, bias=False).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, h, generator=g, dtype=dtype) * 0.3)
    labels = torch.randint(0, v, (2, n), generator=g)
    labels[torch.rand(2, n, generator=g) < 0.4] = -100
    return hidden, head, labels


def _loss_and_grads(hidden, head, labels, cfg):
    hidden.grad = None
    head.zero_grad(set_to_none=True)
    loss = head_loss(hidden, head, labels, cfg)
    (loss * 0.37).backward()  # a non-unit upstream gradient, as the loop's 1/tokens scale is
    return loss.detach(), hidden.grad.clone(), [p.grad.clone() for p in head.parameters()]


@pytest.mark.parametrize("chunk", [1, 5, 64, 4096])
@pytest.mark.parametrize("post", [{}, {"softcap": 3.0}, {"logit_scale": 0.5}])
def test_chunked_equals_full_loss_and_grads(chunk, post):
    hidden, head, labels = _case()
    full = _loss_and_grads(hidden, head, labels, LossConfig("full", **post))
    chunked = _loss_and_grads(hidden, head, labels, LossConfig("chunked", chunk, **post))
    torch.testing.assert_close(chunked[0], full[0], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(chunked[1], full[1], atol=1e-10, rtol=1e-10)
    for a, b in zip(chunked[2], full[2], strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    # And the full path is what it claims: plain cross-entropy over the kept positions.
    ref = summed_cross_entropy(head(hidden).detach(), labels) if not post else None
    if ref is not None:
        torch.testing.assert_close(full[0], ref.to(full[0].dtype))


def test_other_heads_go_through_checkpointed_chunks():
    """A head that is not a plain bias-free Linear (biased, LoRA-wrapped) is chunked with checkpointing."""
    hidden, head, labels = _case()
    biased = nn.Linear(16, 50, bias=True).to(torch.float64)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.normal_()
    full = _loss_and_grads(hidden, biased, labels, LossConfig("full"))
    chunked = _loss_and_grads(hidden, biased, labels, LossConfig("chunked", 7))
    for a, b in zip([chunked[0], chunked[1], *chunked[2]], [full[0], full[1], *full[2]], strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_frozen_head_and_no_trained_positions():
    hidden, head, labels = _case()
    head.weight.requires_grad_(False)
    loss = head_loss(hidden, head, labels, LossConfig("chunked", 8))
    loss.backward()
    assert head.weight.grad is None and hidden.grad is not None
    none = torch.full_like(labels, -100)
    hidden.grad = None
    loss = head_loss(hidden, head, none, LossConfig("chunked", 8))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(hidden.grad) == 0
    with torch.no_grad():  # eval: no gradient work, same value
        torch.testing.assert_close(head_loss(hidden, head, labels, LossConfig("chunked", 8)),
                                   head_loss(hidden, head, labels, LossConfig("full")))


def test_bf16_autocast_is_as_accurate_as_full_path():
    """Under bf16 autocast both paths round differently; the chunked one must be no further from fp32 than full."""
    hidden, head, labels = _case(dtype=torch.float32)
    exact = _loss_and_grads(hidden, head, labels, LossConfig("full"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = _loss_and_grads(hidden, head, labels, LossConfig("full"))
        chunked = _loss_and_grads(hidden, head, labels, LossConfig("chunked", 16))
    assert chunked[1].dtype == torch.float32 and chunked[2][0].dtype == torch.float32
    for got, ref, want in zip([chunked[0], chunked[1], chunked[2][0]], [full[0], full[1], full[2][0]],
                              [exact[0], exact[1], exact[2][0]], strict=True):
        err_chunked, err_full = (got - want).abs().max(), (ref - want).abs().max()
        assert err_chunked <= 2 * err_full + 1e-6, (err_chunked, err_full)


@pytest.mark.parametrize("family", ["llama", "qwen2_bias_tied"])
def test_model_loss_and_grads_match_transformers(tmp_path, family):
    """`model(ids, labels=...)` (chunked) gives transformers' loss and gradients, tied head included."""
    pytest.importorskip("transformers")
    hf = save_hf_checkpoint(family, tmp_path).train()
    ours = load_pretrained(tmp_path).train()
    ours.loss_config = LossConfig("chunked", 7)
    ids = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(3))
    ref_grads = assert_step_loss_matches(hf, ours, ids)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, atol=1e-5, rtol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")


_MEMORY_SCRIPT = r"""
import json, resource, sys, torch
from trainer.loss import LossConfig
from trainer.model import Transformer
from trainer.model_config import ModelConfig

impl, seq, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
cfg = ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, model_type="qwen2")
model = Transformer(cfg)
model.init_weights()
model.loss_config = LossConfig(impl)
ids = torch.randint(0, vocab, (1, seq))
labels = torch.randint(0, vocab, (1, seq))
labels[:, : seq // 4] = -100  # a prompt, as in SFT rows
cu = torch.tensor([0, seq // 2, seq])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loss = model(ids, cu_seqlens=cu, labels=labels)
loss.backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"loss": float(loss.detach()), "before_kib": before, "peak_kib": after}))
"""


@pytest.mark.slow
def test_peak_memory_far_below_full_logits(repo_root):
    """One step at seq 4096 with Qwen's 151,936-token vocabulary: the chunked loss's process peak (RSS high-water
    mark of a fresh process, above what it held before the step) is a small fraction of the full path's."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo_root))
    out = {}
    for impl in ("chunked", "full"):
        proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, impl, "4096", "151936"], cwd=repo_root,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["chunked"]["loss"] == pytest.approx(out["full"]["loss"], rel=1e-4)
    grown = {k: v["peak_kib"] - v["before_kib"] for k, v in out.items()}
    # Full: 3 072 trained + 1 024 untrained positions x 151 936 x fp32 logits, log-softmax and gradients (~7 GiB);
    # chunked: 1 024-token chunks of logits (~0.6 GiB each) and the head's gradient.
    assert grown["chunked"] < 0.2 * grown["full"], grown


def test_lora_wrapped_head_matches_full_path(tmp_path):
    """An adapted (untied) lm_head goes through the checkpointed chunks: same loss and adapter gradients."""
    pytest.importorskip("transformers")
    from trainer.config import PeftSection
    from trainer.lora import load_lora_model

    save_hf_checkpoint("llama", tmp_path)
    cfg = PeftSection(pet_type="lora", target_modules="lm_head|.*q_proj", lora_b_init="normal")
    ids = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(5))
    labels = ids.roll(-1, 1)
    labels[:, :5] = -100
    out = {}
    for impl in ("full", "chunked"):
        model = load_lora_model(str(tmp_path), cfg, seed=0).train()
        model.loss_config = LossConfig(impl, 6)
        loss = model(ids, labels=labels)
        loss.backward()
        out[impl] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert "lm_head.lora_B" in out["chunked"][1]
    torch.testing.assert_close(out["chunked"][0], out["full"][0], atol=1e-5, rtol=1e-6)
    for name, g in out["full"][1].items():
        torch.testing.assert_close(out["chunked"][1][name], g, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
