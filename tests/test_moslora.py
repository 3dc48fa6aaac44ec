"""MoSLoRA (peft.lora_use_mixer): y = W x + s B M A x with a trainable r x r mixer M (Wu et al. 2024), checked
against a direct implementation of that equation, then exported folded (A' = M A) as a plain PEFT LoRA that
peft loads with the same logits, and trained through `trainer run`."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny_run import make_tokenizer_and_model, pack_rows, tiny_config
from trainer.config import ConfigError, PeftSection, load_config
from trainer.lora import load_lora_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("moslora")
    model_dir = make_tokenizer_and_model(root)
    return root, model_dir


def test_config():
    assert load_config(None, ["peft.pet_type=lora", "peft.lora_use_mixer=true"]).peft.lora_use_mixer
    with pytest.raises(ConfigError, match="cannot be combined"):
        load_config(None, ["peft.pet_type=lora", "peft.lora_use_mixer=true", "peft.use_dora=true"])
    with pytest.raises(ConfigError, match="lora_use_mixer needs peft.pet_type"):
        load_config(None, ["peft.lora_use_mixer=true"])


def test_module_is_the_papers_equation_forward_and_gradients(tiny):
    _, model_dir = tiny
    cfg = PeftSection(pet_type="lora", target_modules=".*proj", lora_use_mixer=True, lora_b_init="normal",
                      lora_rank=4, lora_alpha=8.0)
    model = load_lora_model(str(model_dir), cfg, seed=2)
    module = model.model.layers[1].mlp.down_proj
    w = module.base_layer.weight.detach()
    a, b, m = (t.detach().clone().requires_grad_() for t in (module.lora_A, module.lora_B, module.lora_AB))
    assert m.shape == (4, 4) and not torch.equal(m, torch.eye(4))
    x = torch.randn(3, 5, w.shape[1], generator=torch.Generator().manual_seed(1))
    s = 8.0 / 4
    want = x @ w.T + s * (b @ m @ a @ x.unsqueeze(-1)).squeeze(-1)  # W x + s B M A x, per token
    got = module(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(2))
    (got * g).sum().backward()
    (want * g).sum().backward()
    for ours, ref in ((module.lora_A, a), (module.lora_B, b), (module.lora_AB, m)):
        torch.testing.assert_close(ours.grad, ref.grad, atol=1e-5, rtol=1e-4)
    # dL/dM = s B^T G (A X)^T summed over tokens, written out: the mixer's gradient in closed form.
    tokens_x, tokens_g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    closed = s * b.detach().T @ tokens_g.T @ (tokens_x @ a.detach().T)
    torch.testing.assert_close(module.lora_AB.grad, closed, atol=1e-5, rtol=1e-4)


def test_export_is_a_plain_peft_lora_with_the_same_logits(tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from trainer.adapters import save_adapter

    _, model_dir = tiny
    cfg = PeftSection(pet_type="lora", target_modules=".*proj", lora_use_mixer=True, lora_b_init="normal")
    ours = load_lora_model(str(model_dir), cfg, seed=4)
    save_adapter(ours, tmp_path / "adapter", cfg)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = torch.randint(0, base.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_trainer_run_learns(tiny):
    from trainer.loop import train

    root, model_dir = tiny
    data_dir = pack_rows(model_dir, root / "data", n_records=120, seq_length=128)
    result = train(tiny_config(model_dir, data_dir, root / "run", "train.lr=3e-2", "train.seed=7",
                               "train.max_steps=16", "data.micro_batch_size=2", "peft.pet_type=lora",
                               "peft.lora_use_mixer=true", "peft.target_modules=.*proj",
                               "peft.freeze_exclude=[model.norm.weight]"))
    assert sum(result.losses[-4:]) / 4 < sum(result.losses[:4]) / 4 - 0.1, result.losses
