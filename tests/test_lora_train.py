"""LoRA in the trainer: config checks, surgery and freezing, LoRA+ groups, NEFTune, a run that learns,
adapter-only checkpoints and exports (PEFT format, optionally merged), and the merge-lora command."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.helpers.tiny_run import tiny_config, tiny_setup
from trainer.config import ConfigError, PeftSection, load_config
from trainer.lora import apply_freeze, apply_lora, install_neftune, load_lora_model, translate_targets
from trainer.model import Transformer
from trainer.model_config import ModelConfig
from trainer.optim import build_optimizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("lora"))


def _meta_model(model_dir) -> Transformer:
    with torch.device("meta"):
        return Transformer(ModelConfig.from_pretrained(model_dir))


@pytest.mark.parametrize("override, message", [
    ("peft.lora_rank=0", "lora_rank must be >= 1"),
    ("peft.lora_a_init=uniform", "lora_a_init: 'uniform' is not one of"),
    ("peft.target_modules='(q_proj'", "not a valid regex"),
    ("peft.lora_dropout=1.0", "lora_dropout must be in [0, 1)"),
    ("peft.r=4", "did you mean 'lora_rank'"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(None, ["peft.pet_type=lora", override])


def test_config_refuses_lora_flags_without_lora_and_accepts_mindformers_zero():
    with pytest.raises(ConfigError, match="use_dora needs peft.pet_type: lora"):
        load_config(None, ["peft.use_dora=true"])
    with pytest.raises(ConfigError, match="cannot be combined"):
        load_config(None, ["peft.pet_type=lora", "peft.pissa=true", "peft.use_dora=true"])
    cfg = load_config(None, ["peft.pet_type=lora", "peft.lora_a_init=normal", "peft.lora_b_init=zero"])
    assert cfg.peft.lora_b_init == "zeros"


def test_mindformers_names_and_surgery_and_freezing(tiny):
    _, model_dir, _ = tiny
    assert translate_targets(".*wq|.*wv|.*w2|feed_forward.w1") == ".*q_proj|.*v_proj|.*down_proj|mlp.gate_proj"
    model = _meta_model(model_dir)
    cfg = PeftSection(pet_type="lora", target_modules=r"model\.layers\.0\..*(wq|w3)",
                      freeze_exclude=["model.norm.weight"])
    wrapped = apply_lora(model, cfg)
    assert wrapped == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"]
    apply_freeze(model, cfg)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["model.layers.0.mlp.up_proj.lora_A", "model.layers.0.mlp.up_proj.lora_B",
                         "model.layers.0.self_attn.q_proj.lora_A", "model.layers.0.self_attn.q_proj.lora_B",
                         "model.norm.weight"]

    full = _meta_model(model_dir)  # full fine-tuning: include freezes, exclude (wins) keeps training
    apply_freeze(full, PeftSection(freeze_include=["model.layers.*"], freeze_exclude=["*.mlp.*"]))
    frozen = {n for n, p in full.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("model.layers.") and ".mlp." not in n for n in frozen)
    assert full.model.layers[1].mlp.down_proj.weight.requires_grad


def test_surgery_errors_are_explained(tiny):
    _, model_dir, _ = tiny
    with pytest.raises(ValueError, match="matches no Linear or Embedding module.*names look like"):
        apply_lora(_meta_model(model_dir), PeftSection(pet_type="lora", target_modules=".*query"))
    with pytest.raises(ValueError, match="tied to embed_tokens"):  # the tiny Qwen3 ties lm_head
        apply_lora(_meta_model(model_dir), PeftSection(pet_type="lora", target_modules="lm_head"))
    adapted = _meta_model(model_dir)
    both = PeftSection(pet_type="lora", target_modules=".*v_proj", freeze_exclude=["*.v_proj.weight"])
    apply_lora(adapted, both)
    with pytest.raises(ValueError, match="base weight of a LoRA-adapted module"):
        apply_freeze(adapted, both)
    with pytest.raises(ValueError, match="freeze_exclude: nope.* match"):
        apply_freeze(_meta_model(model_dir), PeftSection(freeze_exclude=["nope*"]))


def test_loraplus_groups_and_neftune(tiny):
    _, model_dir, _ = tiny
    cfg = PeftSection(pet_type="lora", target_modules=".*q_proj|model.embed_tokens")
    model = load_lora_model(str(model_dir), cfg, seed=0)
    train_cfg = load_config(None, ["train.lr=1e-3"]).train
    opt = build_optimizer(model, train_cfg, loraplus_lr_ratio=16.0)
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    b_ids = {id(p) for n, p in model.named_parameters() if n.endswith(("lora_B", "lora_embedding_B"))}
    assert by_lr[1.6e-2] == b_ids and len(b_ids) == 3
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in model.parameters())

    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    embed = model.model.embed_tokens
    with torch.no_grad():
        clean = embed(ids)
        handle = install_neftune(model, alpha=5.0)
        model.train()
        noisy = embed(ids)
        bound = 5.0 / math.sqrt(10 * clean.shape[-1])
        assert 0 < (noisy - clean).abs().max() <= bound + 1e-6
        model.eval()
        torch.testing.assert_close(embed(ids), clean)  # no noise outside training
        handle.remove()


def _config(root, model_dir, data_dir, name, *extra):
    return tiny_config(model_dir, data_dir, root / name, "train.lr=3e-2", "train.warmup_steps=2", "train.seed=7",
                       "train.deterministic=true", "peft.pet_type=lora", "peft.lora_rank=8",
                       "peft.target_modules=.*proj", *extra)


def test_lora_run_learns_saves_adapters_only_and_exports_peft(tiny, monkeypatch, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from torch.distributed.checkpoint import FileSystemReader

    from trainer.loop import train

    root, model_dir, data_dir = tiny
    # A random tiny model's frozen tied lm_head bounds its logits; training the final norm in full
    # (freeze_exclude, exported as PEFT modules_to_save) lets the adapters' progress show in the loss.
    # Relative paths, as a user in the project directory writes them: the export must not depend on that cwd.
    monkeypatch.chdir(root)
    result = train(_config(root, model_dir.relative_to(root), data_dir.relative_to(root), "run",
                           "train.max_steps=24", "data.micro_batch_size=2",
                           "checkpoint.every_steps=12", "peft.export_merged=true", "peft.loraplus_lr_ratio=2",
                           "peft.freeze_exclude=[model.norm.weight]"))
    monkeypatch.chdir(tmp_path)
    first, last = sum(result.losses[:4]) / 4, sum(result.losses[-4:]) / 4
    assert last < first - 0.2, result.losses
    assert 0 < result.trainable_params < 0.2 * result.total_params
    out = root / "run"
    # Checkpoints hold the adapters and their optimizer state, never the frozen base.
    meta = FileSystemReader(str(out / "checkpoints" / "step-00000024")).read_metadata()
    model_keys = [k for k in meta.state_dict_metadata if k.startswith("model.")]
    assert model_keys and all(".lora_" in k or k == "model.model.norm.weight" for k in model_keys), model_keys
    assert any(k.startswith("optim.state.") and ".lora_B" in k for k in meta.state_dict_metadata)
    # The export is a PEFT adapter: peft loads it onto the transformers base model. It stands alone: the
    # tokenizer, a model card, the base model by absolute path, files with ordinary permissions.
    from formats.atomic import plain_file_mode
    from formats.manifest import dataset_fingerprint, read_manifest
    from formats.tokenizer_id import TOKENIZER_FILES

    files = sorted(p.name for p in (out / "export").iterdir())
    tokenizer_files = sorted(n for n in TOKENIZER_FILES if (model_dir / n).is_file())
    assert files == sorted(["README.md", "adapter_config.json", "adapter_model.safetensors", *tokenizer_files])
    assert (out / "export" / "adapter_model.safetensors").stat().st_mode & 0o777 == plain_file_mode()
    card = (out / "export" / "README.md").read_text()
    assert "library_name: peft" in card and dataset_fingerprint(read_manifest(data_dir)) in card
    config = json.loads((out / "export" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model_dir.resolve())
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(out / "export", dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out / "export")
    assert tok("red cat").input_ids == transformers.AutoTokenizer.from_pretrained(model_dir)("red cat").input_ids
    assert config["modules_to_save"] == ["model.norm"]
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tuned = peft.PeftModel.from_pretrained(base, out / "export").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "export-merged", dtype=torch.float32)
    plain = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.randint(0, plain.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tuned(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(auto(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(plain(input_ids=ids).logits, want, atol=1e-3)  # training changed something


def test_merge_lora_command(tiny, tmp_path):
    from click.testing import CliRunner

    from cli.trainer import main
    from trainer.adapters import save_adapter

    root, model_dir, _ = tiny
    cfg = PeftSection(pet_type="lora", target_modules=".*v_proj", lora_b_init="normal")
    model = load_lora_model(str(model_dir), cfg, seed=1)
    save_adapter(model, tmp_path / "adapter", cfg)
    args = ["merge-lora", "--base", str(model_dir), "--adapter", str(tmp_path / "adapter"),
            "-o", str(tmp_path / "merged"), "--json"]
    runner = CliRunner()
    done = runner.invoke(main, args)
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["merged_modules"] == 2
    again = runner.invoke(main, args)
    assert again.exit_code == 1 and "already exists" in again.stderr
    (tmp_path / "bad").mkdir()
    bad = runner.invoke(main, args[:4] + [str(tmp_path / "bad"), "-o", str(tmp_path / "m2")])
    assert bad.exit_code == 1 and "adapter_config.json" in bad.stderr and not (tmp_path / "m2").exists()


def _targets(model_dir, spec, **extra):
    model = _meta_model(model_dir)
    cfg = PeftSection(pet_type="lora", target_modules=spec, **extra)
    wrapped = apply_lora(model, cfg)
    apply_freeze(model, cfg)
    return wrapped, sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_target_modules_in_peft_conventions(tiny):
    _, model_dir, _ = tiny
    regex, _ = _targets(model_dir, ".*q_proj|.*v_proj")
    assert len(regex) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in regex)  # 2 layers
    assert _targets(model_dir, ["q_proj", "v_proj"])[0] == regex  # a YAML list: PEFT's suffix match
    assert _targets(model_dir, "q_proj|v_proj")[0] == regex  # plain names joined by |: the same
    linear, _ = _targets(model_dir, "all-linear")
    assert len(linear) == 2 * 7 and "lm_head" not in linear  # q k v o gate up down per layer, not the head
    assert load_config(None, ["peft.pet_type=lora", "peft.target_modules=[q_proj, v_proj]"]).peft.target_modules \
        == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match=r"read as names nope \(suffix match\)\) matches no Linear"):
        _targets(model_dir, ["nope"])


def test_mindformers_qwen3_guide_names_configure_the_same_run_as_hf_names(tiny):
    """MindFormers' Qwen3 LoRA guide, verbatim: Megatron-style fused names, freeze everything but LoRA."""
    _, model_dir, _ = tiny
    guide = _targets(model_dir, ".*word_embeddings|.*linear_qkv|.*linear_proj|.*linear_fc1|.*linear_fc2",
                     freeze_include=["*"], freeze_exclude=["*lora*"])
    hf = _targets(model_dir, ".*embed_tokens|.*q_proj|.*k_proj|.*v_proj|.*o_proj|.*gate_proj|.*up_proj|.*down_proj")
    assert guide == hf
    assert "model.embed_tokens" in guide[0] and all("lora" in n for n in guide[1])


def test_modules_to_save_train_in_full_beside_the_adapters(tiny):
    _, model_dir, _ = tiny
    _, trainable = _targets(model_dir, ["q_proj"], modules_to_save=["norm"])
    assert "model.norm.weight" in trainable and "model.layers.0.self_attn.q_proj.lora_A" in trainable
    with pytest.raises(ValueError, match="modules_to_save: nothing_here match"):
        _targets(model_dir, ["q_proj"], modules_to_save=["nothing_here"])
