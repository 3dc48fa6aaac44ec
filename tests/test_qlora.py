"""QLoRA: LoRA on an NF4-quantized frozen base (torchao), checked against torchao's own quantization, peft on
the dequantized base, and through `trainer run` (loss falls, exact resume, PEFT export, merge-lora)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.peft_check import assert_merge_equals_peft
from tests.helpers.tiny_run import logged_losses, tiny_setup
from trainer.config import ConfigError, PeftSection, load_config
from trainer.lora import load_lora_model

torchao_q = pytest.importorskip("torchao.quantization")
NF4Tensor = torchao_q.NF4Tensor

# The tiny model's weights (64 x 64, 32 x 64, ...) are smaller than QLoRA's 64 x 256 quantization unit:
# a double-quantization block of 4 scales lets every Linear of the tiny model be quantized.
SCALER_BLOCK = 4
QUANT = ["peft.weight_quantize_algo=nf4", f"peft.qlora_weight_double_quant_block_size={SCALER_BLOCK}"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("qlora"))


def _peft(**kw) -> PeftSection:
    return PeftSection(pet_type="lora", target_modules=".*proj", weight_quantize_algo="nf4",
                       qlora_weight_double_quant_block_size=SCALER_BLOCK, **kw)


def test_config_keys_and_errors():
    cfg = load_config(None, ["peft.pet_type=lora", *QUANT])
    assert cfg.peft.weight_quantize_algo == "nf4" and cfg.peft.qlora_weight_blocksize == 64
    for extra, message in [
        (["peft.weight_quantize_algo=int3"], "weight_quantize_algo: 'int3' is not one of"),
        (["peft.weight_quantize_algo=nf4", "peft.use_dora=true"], "cannot be combined with pissa or use_dora"),
        (["peft.weight_quantize_algo=nf4", "peft.qlora_weight_blocksize=63"], "even number"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["peft.pet_type=lora", *extra])
    with pytest.raises(ConfigError, match="weight_quantize_algo needs peft.pet_type"):
        load_config(None, ["peft.weight_quantize_algo=nf4"])


def test_nf4_base_is_torchaos_quantization_of_the_checkpoint(tiny):
    _, model_dir, _ = tiny
    ckpt = load_file(model_dir / "model.safetensors")
    model = load_lora_model(str(model_dir), _peft(), seed=0)
    quantized = {n.replace(".base_layer.", "."): p for n, p in model.named_parameters() if isinstance(p, NF4Tensor)}
    linear = sorted(k for k in ckpt if ".layers." in k and k.endswith("proj.weight"))
    assert sorted(quantized) == linear  # every decoder Linear, adapted (q/k/v/o, MLP) or not
    for key, param in quantized.items():
        want = NF4Tensor.from_tensor(ckpt[key], 64, SCALER_BLOCK).get_original_weight()
        assert torch.equal(param.get_original_weight(), want), key
        assert not torch.equal(want, ckpt[key])  # it really is quantized
    # Embedding / head and norms stay full precision.
    assert torch.equal(model.model.embed_tokens.weight, ckpt["model.embed_tokens.weight"])
    assert all(not isinstance(p, NF4Tensor) for n, p in model.named_parameters() if "norm" in n)


def test_default_blocks_skip_small_tensors_and_say_so(tiny, caplog):
    _, model_dir, _ = tiny
    with caplog.at_level("WARNING"):
        model = load_lora_model(str(model_dir), PeftSection(pet_type="lora", weight_quantize_algo="nf4"), seed=0)
    assert not any(isinstance(p, NF4Tensor) for p in model.parameters())  # 64 x 64 < 64 x 256 weights
    assert "left in float32" in caplog.text and "model.layers.0.self_attn.q_proj" in caplog.text


def test_forward_and_adapter_gradients_match_peft_on_the_dequantized_base(tiny, tmp_path):
    """Our QLoRA model = peft's LoRA on an HF model whose Linear weights are torchao's dequantized NF4."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from trainer.adapters import save_adapter

    _, model_dir, _ = tiny
    cfg = _peft(lora_b_init="normal")
    ours = load_lora_model(str(model_dir), cfg, seed=3)
    save_adapter(ours, tmp_path / "adapter", cfg)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, module in hf.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                module.weight.copy_(NF4Tensor.from_tensor(module.weight.detach().clone(), 64, SCALER_BLOCK)
                                    .get_original_weight())
    tuned = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter", is_trainable=True)
    ids = torch.randint(0, hf.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    logits = ours(ids)
    want = tuned(input_ids=ids).logits
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
    logits.float().square().mean().backward()
    want.float().square().mean().backward()
    ours_a = ours.model.layers[1].mlp.down_proj.lora_A.grad
    peft_a = tuned.base_model.model.model.layers[1].mlp.down_proj.lora_A["default"].weight.grad
    torch.testing.assert_close(ours_a, peft_a, atol=1e-5, rtol=1e-4)


def _config(root, model_dir, data_dir, name, *extra):
    return load_config(None, [
        f"model.path={model_dir}", f"data.train=[{data_dir}]", f"logging.output_dir={root / name}",
        "logging.progress_bar=false", "train.lr=3e-2", "train.seed=7", "train.schedule=constant",
        "train.deterministic=true", "peft.pet_type=lora", "peft.lora_rank=8", "data.micro_batch_size=2",
        "peft.target_modules=.*proj", "peft.freeze_exclude=[model.norm.weight]", *QUANT, *extra,
    ])


@pytest.mark.slow
def test_qlora_run_learns_resumes_exactly_exports_peft_and_merges(tiny):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from trainer.loop import train

    root, model_dir, data_dir = tiny
    straight = train(_config(root, model_dir, data_dir, "straight", "train.max_steps=24"))
    first, last = sum(straight.losses[:4]) / 4, sum(straight.losses[-4:]) / 4
    assert last < first - 0.2, straight.losses
    train(_config(root, model_dir, data_dir, "resumed", "train.max_steps=12", "checkpoint.every_steps=12"))
    train(_config(root, model_dir, data_dir, "resumed", "train.max_steps=24", "checkpoint.every_steps=12"))
    assert logged_losses(root / "resumed") == logged_losses(root / "straight") == straight.losses
    a = load_file(root / "straight" / "export" / "adapter_model.safetensors")
    b = load_file(root / "resumed" / "export" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The adapter is an ordinary PEFT LoRA for the full-precision base; merge-lora folds it into that base when
    # asked to merge as is (by default it merges into the quantized base the run saw, its quantized_base.json).
    export = root / "straight" / "export"
    assert json.loads((export / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert_merge_equals_peft(model_dir, export, root / "merged", base_as_trained=False)


def test_merge_adapter_cli_merges_into_the_base_the_run_trained_on(tiny, tmp_path):
    """A run on an nf4 base records it beside its adapter; `trainer merge-adapter` then merges into that base by
    default (and with --base-as-trained), bitwise the trainer's own export_merged, and with --base-as-is (or
    without the record) into the full-precision checkpoint. A bad record is refused naming the file."""
    import shutil

    from click.testing import CliRunner

    from cli.trainer import main
    from trainer.loop import train
    from trainer.quantize import BASE_RECORD

    _, model_dir, data_dir = tiny
    train(_config(tmp_path, model_dir, data_dir, "run", "train.max_steps=2", "peft.export_merged=true"))
    export = tmp_path / "run" / "export"
    record = json.loads((export / BASE_RECORD).read_text())
    assert (record["weight_quantize_algo"], record["qlora_weight_blocksize"],
            record["qlora_weight_double_quant_block_size"], record["dtype"]) == ("nf4", 64, SCALER_BLOCK, "float32")
    assert len(record["quantized"]) == 14  # q k v o gate up down x 2 layers
    runner = CliRunner()

    def merge(adapter, name, *flags):
        done = runner.invoke(main, ["merge-adapter", "--base", str(model_dir), "--adapter", str(adapter),
                                    "-o", str(tmp_path / name), "--json", *flags])
        return done, (load_file(tmp_path / name / "model.safetensors") if done.exit_code == 0 else None)

    trainers = load_file(tmp_path / "run" / "export-merged" / "model.safetensors")
    ckpt = load_file(model_dir / "model.safetensors")
    for flags in ((), ("--base-as-trained",)):
        done, merged = merge(export, f"trained{len(flags)}", *flags)
        assert done.exit_code == 0, done.output
        assert json.loads(done.stdout)["base"].startswith("as trained (nf4, 14 tensors")
        assert merged.keys() == trainers.keys() and all(torch.equal(merged[k], trainers[k]) for k in merged)
    plain = tmp_path / "plain-adapter"  # the same adapter without its record: the full-precision merge
    shutil.copytree(export, plain)
    (plain / BASE_RECORD).unlink()
    done, want = merge(plain, "plain")
    assert done.exit_code == 0 and json.loads(done.stdout)["base"] == "as is"
    done, as_is = merge(export, "as-is", "--base-as-is")
    assert done.exit_code == 0 and json.loads(done.stdout)["base"].startswith("as is")
    assert all(torch.equal(as_is[k], want[k]) for k in want)
    adapted = [k for k in ckpt if ".layers." in k and k.endswith("proj.weight")]
    assert all(not torch.equal(as_is[k], trainers[k]) for k in adapted)  # they differ by the quantization error

    # Generation applies the adapter to the same base: its logits are the as-trained merge's, or with
    # base_as_trained=False the full-precision merge's (fp32, unmerged vs merged: rounding only).
    from trainer.generate import load_model

    ids = torch.arange(3, 19).view(1, 16)

    def logits(loaded):
        assert loaded.model.config.vocab_size > 0
        return loaded.model(ids).detach()

    on_trained = load_model(model_dir, export)
    assert on_trained.base_note.startswith("as trained (nf4, 14 tensors")
    torch.testing.assert_close(logits(on_trained), logits(load_model(tmp_path / "trained0")), rtol=1e-5, atol=1e-5)
    on_fp = load_model(model_dir, export, base_as_trained=False)
    assert on_fp.base_note.startswith("as is")
    torch.testing.assert_close(logits(on_fp), logits(load_model(tmp_path / "as-is")), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(on_fp), logits(on_trained), rtol=1e-5, atol=1e-5)
    done = runner.invoke(main, ["generate", "--model", str(model_dir), "--adapter", str(export), "--prompt", "hi",
                                "--max-new-tokens", "2", "--template", "chatml", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["base"].startswith("as trained (nf4")

    done, _ = merge(plain, "none", "--base-as-trained")
    assert done.exit_code == 1 and f"{plain / BASE_RECORD}: not found" in done.stderr
    for field, value, message in [("weight_quantize_algo", "nf3", "weight_quantize_algo 'nf3' is not one of"),
                                  ("dtype", "int8", "dtype 'int8' is not one of"),
                                  ("qlora_weight_blocksize", 0, "qlora_weight_blocksize = 0")]:
        bad = tmp_path / f"bad-{field}"
        shutil.copytree(export, bad)
        (bad / BASE_RECORD).write_text(json.dumps({**record, field: value}))
        done, _ = merge(bad, f"bad-{field}-merged")
        assert done.exit_code == 1 and f"{bad / BASE_RECORD}: {message}" in done.stderr, done.stderr
        assert not (tmp_path / f"bad-{field}-merged").exists()


def test_nf4_storage_is_about_a_quarter_byte_per_weight_plus_scales(tiny):
    """What QLoRA is for: the quantized weights take ~4.1 bits each (4-bit codes, one int8 scale per 64 weights,
    one fp32 factor per 64 x SCALER_BLOCK) instead of 32."""
    _, model_dir, _ = tiny
    model = load_lora_model(str(model_dir), _peft(), seed=0)
    numel = stored = 0
    for p in model.parameters():
        if isinstance(p, NF4Tensor):
            numel += p.numel()
            stored += sum(t.numel() * t.element_size() for t in (p.quantized_data, p.quantized_scalers,
                                                                 p.quantization_factor))
    bits = 8 * stored / numel
    assert 4.0 < bits < 4.0 + 8 / 64 + 32 / (64 * SCALER_BLOCK) + 1e-6, bits


def test_nan_in_a_quantized_tensor_is_refused_naming_it(tiny, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from trainer.weights import WeightsError

    _, model_dir, _ = tiny
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="model.layers.1.mlp.up_proj.weight holds NaN"):
        load_lora_model(str(bad), _peft(), seed=0)


@pytest.mark.slow
def test_hf_backend_quantizes_the_same_linears_and_trains_like_native(tiny):
    pytest.importorskip("transformers")
    from trainer.loop import train

    root, model_dir, data_dir = tiny
    losses = {}
    for backend in ("hf", "native"):
        losses[backend] = train(_config(root, model_dir, data_dir, f"backend-{backend}", "train.max_steps=4",
                                        f"model.backend={backend}", "checkpoint.export=false")).losses
    assert losses["hf"] == pytest.approx(losses["native"], rel=1e-5)
