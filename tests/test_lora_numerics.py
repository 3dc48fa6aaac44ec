"""LoRA numerics against PEFT on tiny random transformers checkpoints: init, forward, gradients, save, merge.

Our adapters are drawn from our own seeded generator (per module name), PEFT's from torch's global RNG, so the
RNG streams differ: for kaiming/normal inits the test copies our A/B values into the PEFT model, then perturbs B
(zero at init) identically on both sides so the adapter path is exercised. PiSSA and the DoRA magnitude are
deterministic functions of the base weight, so those are compared as initialised, without copying.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.tiny_checkpoints import save_hf_checkpoint
from trainer.adapters import save_adapter
from trainer.config import PeftSection
from trainer.lora import LoraEmbedding, lora_modules
from trainer.lora import load_lora_model as build
from trainer.peft_targets import translated_patterns

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VARIANTS = {
    "lora": dict(target_modules=".*q_proj|.*v_proj|.*down_proj"),
    "rslora": dict(target_modules=".*wq|.*wo|.*w3", use_rslora=True, lora_alpha=4.0),  # MindFormers names
    "dora": dict(target_modules=".*k_proj|.*gate_proj", use_dora=True),
    "pissa": dict(target_modules=".*q_proj|.*up_proj", pissa=True),
    "embed_tied": dict(target_modules="model.embed_tokens|.*o_proj", lora_a_init="normal"),
    # PEFT's rank_pattern / alpha_pattern: suffix keys, a full-path regex, a MindFormers name (w2 = down_proj)
    "patterns": dict(target_modules=".*q_proj|.*v_proj|.*down_proj",
                     rank_pattern={"w2": 8, r"layers\.0\.self_attn\.q_proj": 2}, alpha_pattern={"v_proj": 3.0}),
    "pissa_patterns": dict(target_modules=".*q_proj|.*up_proj", pissa=True, rank_pattern={"up_proj": 2},
                           alpha_pattern={"q_proj": 4.0}),
}
FAMILY = {"embed_tied": "qwen2_bias_tied"}


def _peft_config(cfg: PeftSection, targets: list[str]):
    init = "pissa" if cfg.pissa else ("gaussian" if cfg.lora_a_init == "normal" else True)
    return peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                           target_modules=targets, rank_pattern=translated_patterns(cfg.rank_pattern),
                           alpha_pattern=translated_patterns(cfg.alpha_pattern),
                           use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, init_lora_weights=init)


def _pairs(ours, theirs):
    """(our parameter, PEFT's parameter) for every adapter tensor."""
    named = dict(theirs.named_parameters())
    out = []
    for name, module in lora_modules(ours):
        pre = f"base_model.model.{name}"
        if isinstance(module, LoraEmbedding):
            out += [(module.lora_embedding_A, named[f"{pre}.lora_embedding_A.default"]),
                    (module.lora_embedding_B, named[f"{pre}.lora_embedding_B.default"])]
            continue
        out += [(module.lora_A, named[f"{pre}.lora_A.default.weight"]),
                (module.lora_B, named[f"{pre}.lora_B.default.weight"])]
        if module.lora_magnitude_vector is not None:
            out.append((module.lora_magnitude_vector, named[f"{pre}.lora_magnitude_vector.default.weight"]))
    return out


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    variant = request.param
    base_dir = tmp_path_factory.mktemp(variant) / "base"
    save_hf_checkpoint(FAMILY.get(variant, "qwen3_qknorm"), base_dir, seed=3)
    cfg = PeftSection(pet_type="lora", lora_rank=4, **{"lora_alpha": 8.0, **VARIANTS[variant]})
    ours = build(str(base_dir), cfg, seed=11)
    targets = [name for name, _ in lora_modules(ours)]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    theirs = peft.get_peft_model(hf, _peft_config(cfg, targets))
    return variant, base_dir, cfg, ours, theirs


def _ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def test_init_forward_and_gradients_match_peft(pair):
    variant, _, cfg, ours, theirs = pair
    pairs = _pairs(ours, theirs)
    ranks = {name: m.rank for name, m in lora_modules(ours)}
    if variant == "patterns":  # the per-module ranks PEFT built are the ones we built
        assert ranks["model.layers.0.self_attn.q_proj"] == 2 and ranks["model.layers.1.self_attn.q_proj"] == 4
        assert ranks["model.layers.1.mlp.down_proj"] == 8 and ranks["model.layers.0.self_attn.v_proj"] == 4
    with torch.no_grad():
        for mine, ref in pairs:  # deterministic in the base weight: compare, do not copy
            if cfg.pissa or mine.ndim == 1:
                torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)
            if cfg.pissa:  # and the residual base weight PiSSA leaves behind
                q_res = theirs.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
                torch.testing.assert_close(ours.model.layers[0].self_attn.q_proj.base_layer.weight, q_res,
                                           atol=1e-5, rtol=1e-5)
        for mine, ref in pairs:
            if not cfg.pissa and mine.ndim == 2:
                ref.copy_(mine)
            if not cfg.pissa and mine.ndim == 2 and not mine.abs().sum():  # zero B: make the adapter count
                g = torch.Generator().manual_seed(mine.numel())
                noise = torch.randn(mine.shape, generator=g) * 0.05
                mine.copy_(noise)
                ref.copy_(noise)
    ids = _ids(ours.config.vocab_size)
    labels = _ids(ours.config.vocab_size, seed=1)
    out_ours, out_theirs = ours(ids), theirs(input_ids=ids).logits
    torch.testing.assert_close(out_ours, out_theirs, atol=2e-5, rtol=1e-4)
    loss = lambda logits: torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())  # noqa: E731
    loss(out_ours).backward()
    loss(out_theirs).backward()
    for mine, ref in pairs:
        assert mine.grad is not None and mine.grad.abs().sum() > 0
        torch.testing.assert_close(mine.grad, ref.grad, atol=2e-5, rtol=1e-3)
    # Only adapters train.
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in ours.named_parameters() if ".lora_" in n
    }


def test_saved_adapter_loads_in_peft_and_merge_matches(pair, tmp_path):
    from trainer.merge_lora import merge_lora

    variant, base_dir, cfg, ours, _ = pair
    with torch.no_grad():  # stand in for training: move every adapter away from its init
        for name, p in ours.named_parameters():
            if ".lora_" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    out = save_adapter(ours, tmp_path / "adapter", cfg, base_model=str(base_dir))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == (8 if cfg.pissa else 4)  # PiSSA is exported as a rank-2r LoRA on the original W
    if variant == "pissa_patterns":
        assert config["rank_pattern"] == {"up_proj": 4} and config["alpha_pattern"] == {"q_proj": 8.0}
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    loaded = peft.PeftModel.from_pretrained(hf, out).eval()
    ids = _ids(ours.config.vocab_size, seed=5)
    with torch.no_grad():
        expect = ours(ids)
        torch.testing.assert_close(loaded(input_ids=ids).logits, expect, atol=1e-4, rtol=1e-4)

    report = merge_lora(base_dir, out, tmp_path / "merged", show_progress=False)
    assert report.merged_modules == len(lora_modules(ours))
    assert report.untied_embeddings == (variant == "embed_tied")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32,
                                                               attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expect, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("use_dora", [False, True])
def test_dropout_in_training_matches_peft(tmp_path, use_dora):
    """With dropout, both draw their masks from torch's RNG in the same module order, so one seed gives the same
    masks; DoRA then also feeds the dropped-out input to its base branch, as PEFT does."""
    save_hf_checkpoint("qwen3_qknorm", tmp_path, seed=3)
    cfg = PeftSection(pet_type="lora", lora_rank=4, target_modules=".*q_proj|.*down_proj", lora_dropout=0.3,
                      use_dora=use_dora, lora_b_init="normal")
    ours = build(str(tmp_path), cfg, seed=1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    theirs = peft.get_peft_model(hf, _peft_config(cfg, [n for n, _ in lora_modules(ours)]))
    with torch.no_grad():
        for mine, ref in _pairs(ours, theirs):
            ref.copy_(mine)
    ours.train()
    theirs.train()
    ids = _ids(ours.config.vocab_size)
    torch.manual_seed(5)
    got = ours(ids)
    torch.manual_seed(5)
    want = theirs(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    torch.manual_seed(6)
    assert not torch.allclose(ours(ids), got, atol=1e-4)  # the masks really are random
