"""MoRA (peft.use_mora) against a direct implementation of the paper's equations (Jiang et al. 2024): the update
is D M C x with explicit matrices, C the compression (padding by repeating the first features, then chunks of
r^ summed (eq. 6) or each rotated as RoPE position k (eq. 9)) and D the decompression (cut / repeat to `out`).
peft has no MoRA, so the adapter is this project's format; merge-adapter folds it and transformers loads the
result."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.helpers.tiny_run import make_tokenizer_and_model, pack_rows, tiny_config
from trainer.config import ConfigError, PeftSection, load_config
from trainer.lora import load_lora_model
from trainer.peft_methods import MoraLinear, mora_rank


def _pad_matrix(n_in: int, r: int) -> torch.Tensor:
    """[g r, n_in]: the input padded to whole chunks by repeating its first features."""
    g = math.ceil(n_in / r)
    p = torch.zeros(g * r, n_in)
    for i in range(g * r):
        p[i, i if i < n_in else i - n_in] = 1.0
    return p


def _rope_matrix(k: int, r: int) -> torch.Tensor:
    """R_k with R_k x = x cos(k theta) + rotate_half(x) sin(k theta), theta_j = 10000^(-2j/r) (RoPE, position k)."""
    theta = 10000.0 ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
    ang = torch.cat([k * theta, k * theta])
    half = r // 2
    rot = torch.zeros(r, r, dtype=torch.float64)  # rotate_half: [x1, x2] -> [-x2, x1]
    rot[:half, half:] = -torch.eye(half)
    rot[half:, :half] = torch.eye(half)
    return (torch.diag(ang.cos()) + torch.diag(ang.sin()) @ rot).float()


def _decomp_matrix(n_out: int, width: int) -> torch.Tensor:
    """[n_out, width]: cut the first n_out features, repeating the vector when it is shorter."""
    d = torch.zeros(n_out, width)
    for o in range(n_out):
        d[o, o % width] = 1.0
    return d


def reference_delta(m: torch.Tensor, n_in: int, n_out: int, mora_type: int) -> torch.Tensor:
    r = m.shape[0]
    g = math.ceil(n_in / r)
    pad = _pad_matrix(n_in, r)
    if mora_type == 1:  # sum the chunks, one M, repeat
        comp = torch.cat([torch.eye(r)] * g, dim=1) @ pad  # [r, n_in]
        return _decomp_matrix(n_out, r) @ m @ comp
    blocks = torch.block_diag(*[m @ _rope_matrix(k, r) for k in range(g)])  # [g r, g r]
    return _decomp_matrix(n_out, g * r) @ blocks @ pad


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("mora")
    return root, make_tokenizer_and_model(root)


def test_config():
    assert load_config(None, ["peft.pet_type=lora", "peft.use_mora=true"]).peft.mora_type == 6
    with pytest.raises(ConfigError, match="mora_type: '3' is not one of 1, 6"):
        load_config(None, ["peft.pet_type=lora", "peft.use_mora=true", "peft.mora_type=3"])
    with pytest.raises(ConfigError, match="use_mora cannot be combined"):
        load_config(None, ["peft.pet_type=lora", "peft.use_mora=true", "peft.use_dora=true"])


@pytest.mark.parametrize("mora_type", [1, 6])
@pytest.mark.parametrize("n_in, n_out, rank", [(64, 64, 4), (64, 128, 2), (128, 32, 4), (50, 70, 3)])
def test_update_is_the_papers_equation(mora_type, n_in, n_out, rank):
    base = torch.nn.Linear(n_in, n_out, bias=False)
    module = MoraLinear(base, rank, 0.0, mora_type)
    r = mora_rank(n_in, n_out, rank, mora_type)
    assert module.lora_A.shape == (r, r) and abs(r * r - (n_in + n_out) * rank) <= 4 * r + 4
    with torch.no_grad():
        module.lora_A.copy_(torch.randn(r, r, generator=torch.Generator().manual_seed(0)))
    m = module.lora_A.detach().clone().requires_grad_()
    delta = reference_delta(m, n_in, n_out, mora_type)
    x = torch.randn(3, 7, n_in, generator=torch.Generator().manual_seed(1))
    want = x @ (base.weight.detach() + delta).T
    got = module(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(2))
    (got * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(module.lora_A.grad, m.grad, atol=1e-4, rtol=1e-4)
    from trainer.peft_methods import mora_delta

    torch.testing.assert_close(mora_delta(module.lora_A.detach(), n_in, n_out, mora_type), delta.detach(),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_trainer_run_learns_and_merge_adapter_reproduces_it(tiny):
    transformers = pytest.importorskip("transformers")
    from trainer.loop import train
    from trainer.merge_lora import merge_lora

    root, model_dir = tiny
    data_dir = pack_rows(model_dir, root / "data", n_records=120, seq_length=128)
    result = train(tiny_config(model_dir, data_dir, root / "run", "train.lr=1e-2", "train.seed=7",
                               "train.max_steps=16", "data.micro_batch_size=2", "peft.pet_type=lora",
                               "peft.use_mora=true", "peft.lora_rank=4", "peft.target_modules=.*proj",
                               "peft.freeze_exclude=[model.norm.weight]"))
    assert sum(result.losses[-4:]) / 4 < sum(result.losses[:4]) / 4 - 0.1, result.losses
    export = root / "run" / "export"
    assert json.loads((export / "adapter_config.json").read_text())["peft_type"] == "MORA"
    merge_lora(model_dir, export, root / "merged", show_progress=False)
    # Our model with the exported M == transformers on the merged weights.
    from safetensors.torch import load_file

    cfg = PeftSection(pet_type="lora", use_mora=True, lora_rank=4, target_modules=".*proj",
                      freeze_exclude=["model.norm.weight"])
    ours = load_lora_model(str(model_dir), cfg, seed=0)
    tensors = load_file(export / "adapter_model.safetensors")
    with torch.no_grad():
        for name, p in ours.named_parameters():
            key = "base_model.model." + name.replace(".lora_A", ".lora_A.weight")
            if key in tensors:
                p.copy_(tensors[key])
    merged = transformers.AutoModelForCausalLM.from_pretrained(root / "merged", dtype=torch.float32)
    ids = torch.randint(0, merged.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, ours(ids), atol=1e-4, rtol=1e-4)
