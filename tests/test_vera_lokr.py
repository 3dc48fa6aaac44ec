"""VeRA and LoKr against peft (test-only): same init where peft's is reproducible, our saved adapters load in
peft with the same logits and adapter gradients, merges equal base + adapter, and both train through
`trainer run` (FSDP2's single-process path, as LoRA) with an exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.tiny_run import logged_losses, tiny_config, tiny_setup
from trainer.config import ConfigError, PeftSection, load_config
from trainer.lora import load_lora_model
from trainer.peft_methods import LokrLinear, VeraLinear, factorization

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ALL = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("vera_lokr"))


def _hf(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, 24), generator=torch.Generator().manual_seed(0))


def test_config_names_and_errors():
    cfg = load_config(None, ["peft.pet_type=vera", "peft.vera_rank=16"])
    assert cfg.peft.pet_type == "vera" and cfg.peft.vera_rank == 16
    with pytest.raises(ConfigError, match="did you mean 'lokr_rank'"):
        load_config(None, ["peft.pet_type=lokr", "peft.lokr_dim=4"])
    with pytest.raises(ConfigError, match="use_dora needs peft.pet_type: lora"):
        load_config(None, ["peft.pet_type=vera", "peft.use_dora=true"])
    with pytest.raises(ConfigError, match="LoKr takes no lora_dropout"):
        load_config(None, ["peft.pet_type=lokr", "peft.lora_dropout=0.1"])
    with pytest.raises(ConfigError, match="pet_type: 'ia3' is not one of"):
        load_config(None, ["peft.pet_type=ia3"])


@pytest.mark.parametrize("dim, factor", [(256, -1), (128, -1), (127, -1), (128, 4), (96, -1), (64, 3)])
def test_factorization_is_peft_s(dim, factor):
    from peft.tuners.lokr.layer import factorization as peft_factorization

    assert factorization(dim, factor) == peft_factorization(dim, factor)


def test_vera_init_is_peft_s_with_the_same_key(tiny):
    _, model_dir, _ = tiny
    cfg = PeftSection(pet_type="vera", target_modules=".*proj", vera_rank=8, vera_projection_prng_key=3,
                      vera_d_initial=0.2)
    ours = load_lora_model(str(model_dir), cfg, seed=0)
    theirs = peft.get_peft_model(_hf(model_dir), peft.VeraConfig(r=8, target_modules=ALL, projection_prng_key=3,
                                                                 d_initial=0.2))
    module = ours.model.layers[0].mlp.down_proj
    assert isinstance(module, VeraLinear)
    assert torch.equal(module.shared[0], theirs.base_model.vera_A["default"])
    assert torch.equal(module.shared[1], theirs.base_model.vera_B["default"])
    peft_down = theirs.base_model.model.model.layers[0].mlp.down_proj
    assert torch.equal(module.vera_lambda_d, peft_down.vera_lambda_d["default"])
    assert torch.equal(module.vera_lambda_b, peft_down.vera_lambda_b["default"])


def test_lokr_shapes_are_peft_s(tiny):
    _, model_dir, _ = tiny
    for rank in (2, 8):  # rank 2 factors W2 (out 64 = 8 x 8, in 128 = 8 x 16), rank 8 keeps it whole
        ours = load_lora_model(str(model_dir), PeftSection(pet_type="lokr", target_modules=".*proj", lokr_rank=rank),
                               seed=0)
        theirs = peft.get_peft_model(_hf(model_dir), peft.LoKrConfig(r=rank, alpha=8, target_modules=ALL))
        want = {k.replace(".default", ""): tuple(v.shape) for k, v in theirs.named_parameters() if "lokr_" in k}
        got = {"base_model.model." + k: tuple(v.shape) for k, v in ours.named_parameters() if "lokr_" in k}
        assert got == want
        w1 = ours.model.layers[0].self_attn.q_proj.lokr_w1
        assert isinstance(ours.model.layers[0].self_attn.q_proj, LokrLinear) and not w1.any()  # W1 = 0: delta 0


def _perturb(model, names):
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in names):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("cfg", [
    PeftSection(pet_type="vera", target_modules=".*proj", vera_rank=8),
    PeftSection(pet_type="lokr", target_modules=".*proj", lokr_rank=2, lokr_alpha=4.0),
    PeftSection(pet_type="lokr", target_modules=r".*\.(q|v)_proj", lokr_rank=8, lokr_alpha=8.0),
], ids=["vera", "lokr-factored", "lokr-whole"])
def test_saved_adapter_loads_in_peft_same_logits_grads_and_merge(tiny, tmp_path, cfg):
    from trainer.adapters import save_adapter
    from trainer.merge_lora import merge_lora

    _, model_dir, _ = tiny
    ours = load_lora_model(str(model_dir), cfg, seed=5)
    _perturb(ours, ("vera_lambda", "lokr_"))  # trained-looking values, not the init's zeros
    save_adapter(ours, tmp_path / "adapter", cfg)
    theirs = peft.PeftModel.from_pretrained(_hf(model_dir), tmp_path / "adapter", is_trainable=True)
    ids = _ids(theirs.config.vocab_size)
    logits, want = ours(ids), theirs(input_ids=ids).logits
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(want, _hf(model_dir)(input_ids=ids).logits, atol=1e-3)
    logits.square().mean().backward()
    want.square().mean().backward()
    grads = {n.replace(".default", ""): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    ours_grads = {"base_model.model." + n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert grads.keys() == ours_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(ours_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    merge_lora(model_dir, tmp_path / "adapter", tmp_path / "merged", show_progress=False)
    merged = _hf(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, want.detach(), atol=1e-4, rtol=1e-4)
        folded = theirs.merge_and_unload().state_dict()  # peft's own merge: the same weights
        mine = merged.state_dict()
        for key, value in folded.items():
            torch.testing.assert_close(mine[key], value, atol=1e-6, rtol=1e-5, msg=key)


def _config(root, model_dir, data_dir, name, *extra):
    return tiny_config(model_dir, data_dir, root / name, "train.lr=3e-2", "train.seed=7", "train.schedule=constant",
                       "train.deterministic=true", "data.micro_batch_size=2", "peft.target_modules=.*proj",
                       "peft.freeze_exclude=[model.norm.weight]", *extra)


@pytest.mark.slow
@pytest.mark.parametrize("method", [["peft.pet_type=vera", "peft.vera_rank=16", "train.lr=5e-2"],
                                    ["peft.pet_type=lokr", "peft.lokr_rank=4"]], ids=["vera", "lokr"])
def test_trainer_run_learns_resumes_exactly_and_exports_peft(tiny, method):
    from click.testing import CliRunner

    from cli.trainer import main
    from trainer.loop import train

    root, model_dir, data_dir = tiny
    tag = method[0].rsplit("=", 1)[1]
    straight = train(_config(root, model_dir, data_dir, f"{tag}-straight", "train.max_steps=16", *method))
    first, last = sum(straight.losses[:4]) / 4, sum(straight.losses[-4:]) / 4
    assert last < first - 0.1, straight.losses
    assert 0 < straight.trainable_params < 0.1 * straight.total_params
    train(_config(root, model_dir, data_dir, f"{tag}-resumed", "train.max_steps=8", "checkpoint.every_steps=8", *method))
    train(_config(root, model_dir, data_dir, f"{tag}-resumed", "train.max_steps=16", "checkpoint.every_steps=8",
                  *method))
    assert logged_losses(root / f"{tag}-resumed") == straight.losses
    export = root / f"{tag}-straight" / "export"
    a, b = load_file(export / "adapter_model.safetensors"), load_file(root / f"{tag}-resumed" / "export" /
                                                                        "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((export / "adapter_config.json").read_text())["peft_type"] == tag.upper()
    # merge-adapter (merge-lora's new name) folds it in; the result is what peft computes from the adapter.
    out = root / f"{tag}-merged"
    done = CliRunner().invoke(main, ["merge-adapter", "--base", str(model_dir), "--adapter", str(export), "-o",
                                     str(out), "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["merged_modules"] == 14
    theirs = peft.PeftModel.from_pretrained(_hf(model_dir), export).eval()
    ids = _ids(theirs.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(_hf(out)(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_resume_refuses_a_changed_adapter_shape_or_quantization():
    from trainer.config import resume_changes

    base = load_config(None, ["peft.pet_type=vera"]).to_dict()
    for change in ("peft.vera_rank=16", "peft.vera_projection_prng_key=1", "peft.pet_type=lokr",
                   "peft.weight_quantize_algo=nf4", "peft.lora_use_mixer=true", "peft.use_mora=true"):
        pet = ["peft.pet_type=lora"] if change.split("=")[0] in ("peft.weight_quantize_algo", "peft.lora_use_mixer",
                                                                  "peft.use_mora") else ["peft.pet_type=vera"]
        now = load_config(None, [*pet, change]).to_dict()
        assert any(line.startswith(change.split("=")[0]) for line in resume_changes(base, now).breaking), change
